//! Cache hints for callers that know which state they will touch next (the simulator
//! steps thousands of nodes, each a few scattered allocations, and knows the next
//! datagrams' receivers ahead of time).

/// Ask the CPU to bring the cache line holding `r` in ahead of its use. Only a hint:
/// it reads nothing, changes nothing and cannot fault; a no-op off x86-64.
#[inline(always)]
pub fn prefetch<T: ?Sized>(r: &T) {
    #[cfg(target_arch = "x86_64")]
    #[allow(unsafe_code)]
    // SAFETY: PREFETCHT0 is a hint that never faults, whatever the address (here that
    // of a live reference); SSE, which it needs, is part of every x86-64 target.
    unsafe {
        std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(
            (r as *const T).cast(),
        );
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = r;
}
