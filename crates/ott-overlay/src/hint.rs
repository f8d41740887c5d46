//! Cache hints for callers that know which state they will touch next (the simulator
//! steps thousands of nodes, each a few scattered allocations, and knows the next
//! datagrams' receivers ahead of time).

/// Ask the CPU to bring the cache line holding `r` in ahead of its use. Only a hint:
/// it reads nothing, changes nothing and cannot fault; a no-op off x86-64.
#[inline(always)]
pub fn prefetch<T: ?Sized>(r: &T) {
    prefetch_at((r as *const T).cast());
}

/// [`prefetch`] every cache line of `r` (a value larger than one line).
#[inline(always)]
pub fn prefetch_all<T>(r: &T) {
    prefetch_lines((r as *const T).cast(), std::mem::size_of::<T>());
}

/// [`prefetch`] every cache line of the slot the next value pushed to the back of
/// `q` goes to, if `q` is empty and its front at the start of its buffer (as a queue
/// drained by [`pop_front_reset`] keeps it): a queue that one value at a time goes
/// through writes the same lines each time, those this brings in.
#[inline(always)]
pub fn prefetch_front<T>(q: &std::collections::VecDeque<T>) {
    prefetch_lines(q.as_slices().0.as_ptr().cast(), std::mem::size_of::<T>());
}

/// [`std::collections::VecDeque::pop_front`], and once the queue is empty its front
/// moved back to the start of its buffer (what `clear` does): the next value pushed
/// goes where [`prefetch_front`] looks, not one slot further round the ring each time.
#[inline]
pub fn pop_front_reset<T>(q: &mut std::collections::VecDeque<T>) -> Option<T> {
    let v = q.pop_front();
    if q.is_empty() {
        q.clear();
    }
    v
}

/// Every cache line of the `len` bytes from `p`, the last one included when `p` does
/// not start on a line's boundary.
#[inline(always)]
fn prefetch_lines(p: *const u8, len: usize) {
    let last = len.saturating_sub(1);
    let mut off = 0;
    while off <= last {
        prefetch_at(p.wrapping_add(off));
        off += 64;
    }
    prefetch_at(p.wrapping_add(last));
}

#[inline(always)]
fn prefetch_at(p: *const u8) {
    #[cfg(target_arch = "x86_64")]
    #[allow(unsafe_code)]
    // SAFETY: PREFETCHT0 is a hint that never faults, whatever the address (here one
    // within a live reference); SSE, which it needs, is part of every x86-64 target.
    unsafe {
        std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(p.cast());
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = p;
}
