//! Clips loaded from files, and looping sources over them.

use std::fs;
use std::io::ErrorKind;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use ott_proto::{flags, MediaKind, StreamInfo};

use crate::error::{ClipError, FramingError};
use crate::mjpeg;
use crate::ts::{self, Restamp, TsFramer, PTS_WRAP};

/// Ticks per second of media timestamps.
pub const CLOCK_RATE: u64 = 90_000;

/// Frame rate of a clip without a sidecar.
pub const DEFAULT_FPS: f64 = 25.0;
/// Highest frame rate accepted in a sidecar.
pub const MAX_FPS: f64 = 1000.0;

/// A whole clip in memory: a stream name, its framing and its frames.
#[derive(Debug, Clone, PartialEq)]
pub struct Clip {
    /// Stream name: the file stem (`news.mjpeg` → `news`).
    pub name: String,
    /// Payload framing.
    pub kind: MediaKind,
    /// Nominal frame rate, frames per second.
    pub fps: f64,
    /// The frames, in order: for MJPEG each is one whole JPEG image (slices of one
    /// buffer); for MPEG-TS each is one unit of whole 188-byte packets ([`ts::Unit`]).
    pub frames: Vec<Bytes>,
    /// Timing of an MPEG-TS clip, from its PCR and timestamps; `None` for MJPEG.
    pub ts: Option<TsTiming>,
}

/// When each unit of an MPEG-TS clip is due, which ones are keyframes, and how a loop
/// continues the previous one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TsTiming {
    /// Due time of each frame from the clip's first frame, 27 MHz (PCR clock), from the
    /// PCR interpolated over the byte position of the frame's first packet.
    pub offsets: Vec<u64>,
    /// Whether each frame is a decodable start.
    pub keyframes: Vec<bool>,
    /// PTS of each frame's primary access unit, 90 kHz.
    pub pts: Vec<Option<u64>>,
    /// Length of one play, 90 kHz: loop `k` adds `k × loop_90k` to every PCR, PTS and DTS.
    pub loop_90k: u64,
    /// Continuity counter shift per loop for each PID, so counters continue across loops.
    pub cc_shift: Vec<(u16, u8)>,
}

impl Clip {
    /// Load a clip file.
    ///
    /// `news.mjpeg` gives stream `news`, its frames split by [`mjpeg::split_frames`]. The
    /// frame rate comes from a sidecar `news.fps` next to it (one number such as `25` or
    /// `12.5`, surrounding whitespace ignored, in `(0, 1000]`), else [`DEFAULT_FPS`].
    /// Errors name the file and the problem: unreadable, empty, not valid MJPEG, no
    /// frame, bad sidecar. `.ts` files (and any other extension) give
    /// [`ClipError::Unsupported`].
    // The file reads of this crate (clips from disk for ott-server); the rest works on bytes.
    #[allow(clippy::disallowed_methods)]
    pub fn load(path: &Path) -> Result<Self, ClipError> {
        let ext = path
            .extension()
            .and_then(|e| e.to_str())
            .map(str::to_ascii_lowercase);
        let kind = match ext.as_deref() {
            Some("mjpeg") => MediaKind::Mjpeg,
            Some("ts") => MediaKind::Ts,
            _ => {
                return Err(ClipError::Unsupported {
                    path: path.to_owned(),
                    what: "this file type (expected .mjpeg or .ts)",
                })
            }
        };
        let name = stream_name(path)?;
        let data = fs::read(path).map_err(|source| ClipError::Read {
            path: path.to_owned(),
            source,
        })?;
        if data.is_empty() {
            return Err(ClipError::Empty {
                path: path.to_owned(),
            });
        }
        let framing = |source| ClipError::Framing {
            path: path.to_owned(),
            kind: kind_name(kind),
            source,
        };
        let clip = match kind {
            MediaKind::Mjpeg => {
                let fps = read_sidecar(&path.with_extension("fps"))?;
                let data = Bytes::from(data);
                match Self::from_mjpeg(name.clone(), fps, data.clone()) {
                    // A file cut short (a copy or a recording that stopped): keep the
                    // whole frames before the cut.
                    Err(e @ FramingError::Truncated { start, .. }) if start > 0 => {
                        tracing::warn!(clip = %path.display(), error = %e,
                            "dropping the truncated last frame of the clip");
                        Self::from_mjpeg(name, fps, data.slice(..start)).map_err(framing)?
                    }
                    r => r.map_err(framing)?,
                }
            }
            MediaKind::Ts => Self::from_ts(name, &data).map_err(framing)?,
        };

        if clip.frames.is_empty() {
            return Err(ClipError::NoFrames {
                path: path.to_owned(),
            });
        }
        tracing::debug!(
            clip = %path.display(),
            frames = clip.frames.len(),
            fps = clip.fps,
            "loaded clip"
        );
        Ok(clip)
    }

    /// A clip from an in-memory MJPEG stream (concatenated JPEG frames); the frames are
    /// zero-copy slices of `data`. No check is made on `fps`.
    pub fn from_mjpeg(
        name: impl Into<String>,
        fps: f64,
        data: Bytes,
    ) -> Result<Self, FramingError> {
        let frames = mjpeg::split_frames(&data)?
            .into_iter()
            .map(|r| data.slice(r))
            .collect();
        Ok(Self {
            name: name.into(),
            kind: MediaKind::Mjpeg,
            fps,
            frames,
            ts: None,
        })
    }

    /// A clip from an in-memory MPEG transport stream, cut into units by [`TsFramer`]
    /// and timed by its PCR.
    ///
    /// Units before the first keyframe are dropped, so the clip (and each loop of it)
    /// starts at a decodable start. The frame rate reported is units per second of one
    /// play. Errors: not a transport stream, no PAT/PMT, no keyframe.
    pub fn from_ts(name: impl Into<String>, data: &[u8]) -> Result<Self, FramingError> {
        if !ts::looks_like_ts(data) {
            return Err(FramingError::NotTs);
        }
        let mut framer = TsFramer::new();
        framer.push(data);
        framer.finish();
        let mut units = Vec::new();
        while let Some(u) = framer.poll_unit() {
            units.push(u);
        }
        if framer.primary().is_none() {
            return Err(FramingError::NoPsi);
        }
        let first_key = units
            .iter()
            .position(|u| u.keyframe)
            .ok_or(FramingError::NoKeyframe)?;
        units.drain(..first_key);
        let positions: Vec<u64> = units.iter().map(|u| u.input_pos).collect();
        let pts: Vec<Option<u64>> = units.iter().map(|u| u.pts).collect();
        let (offsets, pcr_span) = unit_offsets(&positions, &pts, framer.pcr_samples());
        let n = offsets.len() as u64;
        // One play lasts as long as its timestamps span, and longer than its PCR span
        // (so the PCR never goes back at the loop).
        let ts_span = framer.timestamp_span().unwrap_or(0) * 300;
        let loop_90k = pcr_span.max(ts_span).div_ceil(300).max(1);
        let cc_shift = cc_shifts(&units);
        let fps = n as f64 * CLOCK_RATE as f64 / loop_90k as f64;
        let st = framer.stats();
        let name = name.into();
        if st.resync_bytes > 0 {
            tracing::warn!(clip = %name, skipped_bytes = st.resync_bytes,
                "transport stream lost sync (bytes skipped to find the next 0x47): it may show glitches");
        }
        tracing::debug!(
            units = n,
            keyframes = st.keyframes,
            psi_inserted = st.psi_inserted,
            resync_bytes = st.resync_bytes,
            loop_90k,
            "framed transport stream"
        );
        Ok(Self {
            name,
            kind: MediaKind::Ts,
            fps,
            ts: Some(TsTiming {
                offsets,
                keyframes: units.iter().map(|u| u.keyframe).collect(),
                pts,
                loop_90k,
                cc_shift,
            }),
            frames: units.into_iter().map(|u| u.data).collect(),
        })
    }

    /// The catalogue entry of this clip (id derived from the name, rate in milli-fps).
    pub fn info(&self) -> StreamInfo {
        let fps_milli = if self.fps.is_finite() && self.fps > 0.0 {
            // Saturating float-to-int conversion; sidecar rates are at most MAX_FPS.
            (self.fps * 1000.0).round() as u32
        } else {
            0
        };
        StreamInfo::new(self.name.clone(), self.kind, fps_milli)
    }
}

fn kind_name(kind: MediaKind) -> &'static str {
    match kind {
        MediaKind::Mjpeg => "mjpeg",
        MediaKind::Ts => "mpeg-ts",
    }
}

/// Due time of each unit, 27 MHz, relative to the first, and the least length of one
/// play (just past the last PCR and the last unit): the PCR interpolated (and extrapolated at the ends) over byte
/// positions; without two PCRs, the PTS; without PTS, 25 units per second. Never
/// decreasing.
fn unit_offsets(positions: &[u64], pts: &[Option<u64>], pcrs: &[(u64, u64)]) -> (Vec<u64>, u64) {
    const PCR_WRAP: u64 = PTS_WRAP * 300;
    const MAX_STEP: u64 = 10 * 27_000_000;
    // Unwrap the PCR; a jump back or of more than 10 s is a discontinuity: skip it.
    let mut samples: Vec<(u64, u64)> = Vec::with_capacity(pcrs.len());
    let mut prev: Option<(u64, u64)> = None;
    for &(pos, pcr) in pcrs {
        let u = match prev {
            None => 0,
            Some((raw, u)) => {
                let step = pcr.wrapping_sub(raw) % PCR_WRAP;
                if step > MAX_STEP {
                    prev = Some((pcr, u));
                    continue;
                }
                u + step
            }
        };
        if samples.last().is_none_or(|&(p, _)| pos > p) {
            samples.push((pos, u));
        }
        prev = Some((pcr, u));
    }
    let at = |x: u64| -> f64 {
        let i = samples.partition_point(|&(p, _)| p <= x);
        let seg = i.clamp(1, samples.len() - 1);
        let (p0, u0) = samples[seg - 1];
        let (p1, u1) = samples[seg];
        let rate = (u1 as f64 - u0 as f64) / (p1 as f64 - p0 as f64);
        u0 as f64 + (x as f64 - p0 as f64) * rate
    };
    let (raw, end): (Vec<f64>, Option<f64>) = if samples.len() >= 2 {
        (
            positions.iter().map(|&x| at(x)).collect(),
            samples.last().map(|&(_, u)| u as f64 + 300.0),
        )
    } else if pts.iter().all(Option::is_some) && !pts.is_empty() {
        let first = pts.first().copied().flatten().unwrap_or(0);
        let raw = pts
            .iter()
            .map(|p| (p.unwrap_or(0).wrapping_sub(first) % PTS_WRAP) as f64 * 300.0)
            .collect();
        (raw, None)
    } else {
        let raw = (0..positions.len())
            .map(|i| i as f64 * 3600.0 * 300.0)
            .collect();
        (raw, None)
    };
    let base = raw.first().copied().unwrap_or(0.0);
    let mut out = Vec::with_capacity(raw.len());
    let mut last = 0u64;
    for r in raw {
        let v = (r - base).max(0.0).round() as u64;
        last = last.max(v);
        out.push(last);
    }
    let end = match end {
        Some(e) => (e - base).max(0.0).round() as u64,
        // One more average interval after the last unit.
        None => last + last.checked_div(out.len() as u64 - 1).unwrap_or(3600 * 300),
    };
    (out, end.max(last + 1))
}

/// Per PID, how much a loop must add to the continuity counter so that the first packet
/// of a loop follows the last packet of the previous one.
fn cc_shifts(units: &[ts::Unit]) -> Vec<(u16, u8)> {
    let mut first: Vec<(u16, u8)> = Vec::new();
    let mut last: Vec<(u16, u8)> = Vec::new();
    for u in units {
        for pkt in u.data.chunks_exact(ts::PACKET_LEN) {
            let Some(p) = ts::Packet::new(pkt) else {
                continue;
            };
            let pid = p.pid();
            if !first.iter().any(|(q, _)| *q == pid) {
                first.push((pid, p.cc()));
            }
            if p.has_payload() {
                match last.iter_mut().find(|(q, _)| *q == pid) {
                    Some(e) => e.1 = p.cc(),
                    None => last.push((pid, p.cc())),
                }
            }
        }
    }
    first
        .into_iter()
        .filter_map(|(pid, f)| {
            let (_, l) = last.iter().find(|(q, _)| *q == pid)?;
            let shift = (l.wrapping_add(1).wrapping_sub(f)) & 0x0f;
            (shift != 0).then_some((pid, shift))
        })
        .collect()
}

fn stream_name(path: &Path) -> Result<String, ClipError> {
    match path.file_stem().and_then(|s| s.to_str()) {
        Some(s) if !s.is_empty() => Ok(s.to_owned()),
        _ => Err(ClipError::BadName {
            path: path.to_owned(),
        }),
    }
}

// The file reads of this crate (clips from disk for ott-server); the rest works on bytes.
#[allow(clippy::disallowed_methods)]
fn read_sidecar(path: &Path) -> Result<f64, ClipError> {
    let bad = |reason: String| ClipError::BadSidecar {
        path: path.to_owned(),
        reason,
    };
    let text = match fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(DEFAULT_FPS),
        Err(e) => return Err(bad(e.to_string())),
    };
    let t = text.trim();
    let fps: f64 = t
        .parse()
        .map_err(|_| bad(format!("{t:?} is not a number")))?;
    if !(fps.is_finite() && fps > 0.0 && fps <= MAX_FPS) {
        return Err(bad(format!("frame rate {t} is not in (0, {MAX_FPS}]")));
    }
    Ok(fps)
}

/// Load every clip of a directory, sorted by file name.
///
/// Clips are the `.mjpeg` and `.ts` files; every other file (sidecars `.fps`, `README.md`,
/// anything else) is ignored. A missing directory, a file instead of a directory, or a directory with no
/// clip that loads is an error naming the path. A bad clip (empty, garbled, a bad `.fps`
/// sidecar, a stream name taken by another clip) is skipped with a warning naming it and
/// why, and the others are served; a truncated last JPEG is dropped, not the file.
// The file reads of this crate (clips from disk for ott-server); the rest works on bytes.
#[allow(clippy::disallowed_methods)]
pub fn load_dir(dir: &Path) -> Result<Vec<Clip>, ClipError> {
    let read_err = |source| ClipError::Read {
        path: dir.to_owned(),
        source,
    };
    let meta = fs::metadata(dir).map_err(read_err)?;
    if !meta.is_dir() {
        return Err(ClipError::NotADirectory {
            path: dir.to_owned(),
        });
    }
    let mut paths: Vec<PathBuf> = Vec::new();
    for entry in fs::read_dir(dir).map_err(read_err)? {
        let path = entry.map_err(read_err)?.path();
        let ext = path
            .extension()
            .and_then(|e| e.to_str())
            .map(str::to_ascii_lowercase);
        if matches!(ext.as_deref(), Some("mjpeg" | "ts")) && path.is_file() {
            paths.push(path);
        }
    }
    paths.sort();
    let mut clips: Vec<(PathBuf, Clip)> = Vec::new();
    let mut skipped = 0;
    for path in paths {
        // One bad clip must not stop the others from being served.
        let clip = match Clip::load(&path) {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!("skipping clip: {e}");
                skipped += 1;
                continue;
            }
        };
        if let Some((first, _)) = clips.iter().find(|(_, c)| c.name == clip.name) {
            let e = ClipError::DuplicateName {
                name: clip.name,
                first: first.clone(),
                second: path,
            };
            tracing::warn!("skipping clip: {e}");
            skipped += 1;
            continue;
        }
        clips.push((path, clip));
    }
    if clips.is_empty() {
        return Err(ClipError::NoClips {
            path: dir.to_owned(),
            skipped,
        });
    }
    Ok(clips.into_iter().map(|(_, c)| c).collect())
}

/// One frame of a [`ClipSource`], with when it is due.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TimedFrame {
    /// The frame's bytes.
    pub data: Bytes,
    /// Bits of [`flags`].
    pub flags: u8,
    /// When the frame is due, from the start of the play (loops included).
    pub due: Duration,
    /// Media timestamp, 90 kHz (wraps).
    pub timestamp_90k: u32,
}

/// A looping source over one clip.
///
/// Yields the clip's frames in order, forever, each with its due time and timestamp.
/// MJPEG: every frame carries [`flags::KEYFRAME`], frames are due every `1 / fps`, and
/// the first frame after wrapping around also carries [`flags::DISCONTINUITY`].
/// MPEG-TS: keyframe units carry [`flags::KEYFRAME`]; units are due at their PCR time;
/// loop `k` shifts every PCR, PTS and DTS by `k` plays and continues the continuity
/// counters ([`Restamp`]), so the output is one continuous stream and no discontinuity
/// is flagged.
#[derive(Debug, Clone)]
pub struct ClipSource {
    clip: Arc<Clip>,
    next: usize,
    loops: u64,
    restamp: Restamp,
}

impl ClipSource {
    /// A source starting at the clip's first frame.
    pub fn new(clip: impl Into<Arc<Clip>>) -> Self {
        Self {
            clip: clip.into(),
            next: 0,
            loops: 0,
            restamp: Restamp::default(),
        }
    }

    /// The clip played.
    pub fn clip(&self) -> &Arc<Clip> {
        &self.clip
    }

    /// The next frame and its flags. A clip without frames (only possible for a `Clip`
    /// built by hand) yields empty frames with no flag.
    pub fn next_frame(&mut self) -> (Bytes, u8) {
        let f = self.next_timed();
        (f.data, f.flags)
    }

    /// The next frame, its flags, due time and timestamp.
    pub fn next_timed(&mut self) -> TimedFrame {
        let i = self.next;
        let k = self.loops;
        let len = self.clip.frames.len();
        let Some(frame) = self.clip.frames.get(i) else {
            return TimedFrame {
                data: Bytes::new(),
                flags: 0,
                due: Duration::ZERO,
                timestamp_90k: 0,
            };
        };
        let out = match &self.clip.ts {
            None => {
                let n = k * len as u64 + i as u64;
                let fps = if self.clip.fps.is_finite() && self.clip.fps > 0.0 {
                    self.clip.fps
                } else {
                    DEFAULT_FPS
                };
                let mut f = flags::KEYFRAME;
                if k > 0 && i == 0 {
                    f |= flags::DISCONTINUITY;
                }
                TimedFrame {
                    data: frame.clone(),
                    flags: f,
                    due: Duration::from_nanos((n as f64 * 1e9 / fps).round() as u64),
                    // Truncation is the intended wraparound of the 32-bit media clock.
                    timestamp_90k: (n as f64 * CLOCK_RATE as f64 / fps).round() as u64 as u32,
                }
            }
            Some(t) => {
                let shift = k.wrapping_mul(t.loop_90k);
                let at = shift
                    .wrapping_mul(300)
                    .wrapping_add(t.offsets.get(i).copied().unwrap_or(0));
                let data = if k == 0 {
                    frame.clone()
                } else {
                    let mut b = BytesMut::from(&frame[..]);
                    self.restamp.apply(&mut b);
                    b.freeze()
                };
                let ts = match t.pts.get(i).copied().flatten() {
                    Some(p) => p.wrapping_add(shift),
                    None => at / 300,
                };
                TimedFrame {
                    data,
                    flags: if t.keyframes.get(i).copied().unwrap_or(false) {
                        flags::KEYFRAME
                    } else {
                        0
                    },
                    due: Duration::from_nanos(at.saturating_mul(1000) / 27),
                    timestamp_90k: ts as u32,
                }
            }
        };
        self.next += 1;
        if self.next >= len {
            self.next = 0;
            self.loops += 1;
            if let Some(t) = &self.clip.ts {
                let k = self.loops;
                self.restamp = Restamp {
                    ticks_90k: k.wrapping_mul(t.loop_90k) % PTS_WRAP,
                    cc_shift: t
                        .cc_shift
                        .iter()
                        .map(|&(pid, s)| (pid, (u64::from(s).wrapping_mul(k) % 16) as u8))
                        .collect(),
                };
            }
        }
        out
    }
}

#[cfg(test)]
// Tests take the real clock as an arbitrary origin of fake time, and read sample files.
#[allow(clippy::disallowed_methods)]
mod tests {
    use super::*;

    fn videos() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../videos")
    }

    /// A scratch directory private to this test process, emptied first.
    fn scratch(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("ott-media-{}-{name}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        fs::create_dir_all(&d).expect("create scratch dir");
        d
    }

    fn tiny_jpeg(tag: u8) -> Vec<u8> {
        vec![
            0xff, 0xd8, 0xff, 0xfe, 0x00, 0x03, tag, 0xff, 0xda, 0x00, 0x02, tag, 0xff, 0xd9,
        ]
    }

    #[test]
    fn test_sample_clips_frame_counts() {
        // Counts measured with:
        // ffprobe -v error -count_frames -select_streams v:0 \
        //   -show_entries stream=nb_read_frames -of csv=p=0 videos/X.mjpeg
        for (file, frames) in [("countdown.mjpeg", 200), ("bars.mjpeg", 200)] {
            let clip = Clip::load(&videos().join(file)).expect("sample clip loads");
            assert_eq!(clip.frames.len(), frames, "{file}");
            assert_eq!(clip.fps, 25.0);
            assert_eq!(clip.kind, MediaKind::Mjpeg);
            assert!(clip.frames.iter().all(|f| mjpeg::is_complete_jpeg(f)));
            let info = clip.info();
            assert_eq!(info.fps_milli, 25_000);
            assert_eq!(info.id, ott_proto::stream_id_for(&clip.name));
        }
    }

    #[test]
    fn test_load_dir_samples() {
        let clips = load_dir(&videos()).expect("videos dir loads");
        let names: Vec<&str> = clips.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(names, ["bars", "countdown", "testcard"]);
    }

    #[test]
    fn test_load_errors_name_the_file() {
        let d = scratch("errors");
        let empty = d.join("empty.mjpeg");
        fs::write(&empty, b"").expect("write");
        let e = Clip::load(&empty).unwrap_err();
        assert!(matches!(e, ClipError::Empty { .. }));
        assert!(e.to_string().contains("empty.mjpeg"), "{e}");

        let junk = d.join("junk.mjpeg");
        fs::write(&junk, b"hello").expect("write");
        let e = Clip::load(&junk).unwrap_err();
        assert!(matches!(e, ClipError::Framing { .. }), "{e}");
        assert!(e.to_string().contains("junk.mjpeg") && e.to_string().contains("offset 0"));

        let missing = d.join("missing.mjpeg");
        let e = Clip::load(&missing).unwrap_err();
        assert!(matches!(e, ClipError::Read { .. }));
        assert!(e.to_string().contains("missing.mjpeg"), "{e}");

        let ts = d.join("live.ts");
        fs::write(&ts, [0x47u8; 188]).expect("write");
        let e = Clip::load(&ts).unwrap_err();
        assert!(
            matches!(
                e,
                ClipError::Framing {
                    source: FramingError::NoPsi,
                    ..
                }
            ),
            "{e}"
        );
        assert!(e.to_string().contains("live.ts"), "{e}");
        fs::write(&ts, b"hello").expect("write");
        let e = Clip::load(&ts).unwrap_err();
        assert!(
            matches!(
                e,
                ClipError::Framing {
                    source: FramingError::NotTs,
                    ..
                }
            ),
            "{e}"
        );

        let other = d.join("x.avi");
        fs::write(&other, b"RIFF").expect("write");
        assert!(matches!(
            Clip::load(&other),
            Err(ClipError::Unsupported { .. })
        ));
    }

    #[test]
    fn test_sidecar() {
        let d = scratch("sidecar");
        let mut data = tiny_jpeg(1);
        data.extend(tiny_jpeg(2));
        fs::write(d.join("news.mjpeg"), &data).expect("write");
        let clip = Clip::load(&d.join("news.mjpeg")).expect("loads");
        assert_eq!((clip.name.as_str(), clip.fps), ("news", DEFAULT_FPS));
        assert_eq!(clip.frames.len(), 2);

        fs::write(d.join("news.fps"), " 12.5\n").expect("write");
        let clip = Clip::load(&d.join("news.mjpeg")).expect("loads");
        assert_eq!(clip.fps, 12.5);
        assert_eq!(clip.info().fps_milli, 12_500);

        for bad in ["fast", "0", "-3", "inf", "NaN", "5000", ""] {
            fs::write(d.join("news.fps"), bad).expect("write");
            let e = Clip::load(&d.join("news.mjpeg")).unwrap_err();
            assert!(matches!(e, ClipError::BadSidecar { .. }), "{bad}: {e}");
            assert!(e.to_string().contains("news.fps"), "{e}");
        }
    }

    #[test]
    fn test_load_dir_errors() {
        let d = scratch("dir");
        let e = load_dir(&d.join("nope")).unwrap_err();
        assert!(e.to_string().contains("nope"), "{e}");

        fs::write(d.join("file"), b"x").expect("write");
        let e = load_dir(&d.join("file")).unwrap_err();
        assert!(matches!(e, ClipError::NotADirectory { .. }), "{e}");

        fs::write(d.join("README.md"), b"# clips").expect("write");
        let e = load_dir(&d).unwrap_err();
        assert!(matches!(e, ClipError::NoClips { skipped: 0, .. }), "{e}");
        // Bad clips alone: none to serve, and the error says how many were skipped.
        fs::write(d.join("a.ts"), [0x47u8; 188]).expect("write");
        fs::write(d.join("e.mjpeg"), b"").expect("write");
        let e = load_dir(&d).unwrap_err();
        assert!(matches!(e, ClipError::NoClips { skipped: 2, .. }), "{e}");

        // A good clip is served whatever the others are: garbled TS, empty file,
        // garbage, a bad sidecar, a name taken twice.
        fs::write(d.join("b.mjpeg"), tiny_jpeg(1)).expect("write");
        fs::write(d.join("c.mjpeg"), b"\xff\xd8\xff").expect("write");
        fs::write(d.join("f.mjpeg"), tiny_jpeg(2)).expect("write");
        fs::write(d.join("f.fps"), "fast").expect("write");
        fs::write(d.join("b.MJPEG"), tiny_jpeg(3)).expect("write");
        let clips = load_dir(&d).expect("loads");
        let names: Vec<&str> = clips.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(names, ["b"]);

        // A truncated last frame is dropped, not the file.
        let mut cut = [tiny_jpeg(4), tiny_jpeg(5)].concat();
        cut.truncate(cut.len() - 3);
        fs::write(d.join("g.mjpeg"), &cut).expect("write");
        let clips = load_dir(&d).expect("loads");
        let g = clips.iter().find(|c| c.name == "g").expect("g is served");
        assert_eq!(g.frames.len(), 1);
        assert_eq!(&g.frames[0][..], &tiny_jpeg(4)[..]);
    }

    #[test]
    fn test_clip_source_loops_with_flags() {
        let mut data = Vec::new();
        for t in 0..3 {
            data.extend(tiny_jpeg(t));
        }
        let clip = Clip::from_mjpeg("x", 25.0, Bytes::from(data)).expect("valid");
        let frames = clip.frames.clone();
        let mut src = ClipSource::new(clip);
        for round in 0..3 {
            for (i, want) in frames.iter().enumerate() {
                let (f, fl) = src.next_frame();
                assert_eq!(&f, want);
                assert!(fl & flags::KEYFRAME != 0);
                let disc = round > 0 && i == 0;
                assert_eq!(
                    fl & flags::DISCONTINUITY != 0,
                    disc,
                    "round {round} frame {i}"
                );
            }
        }
        let mut empty = ClipSource::new(Clip {
            name: "e".into(),
            kind: MediaKind::Mjpeg,
            fps: 25.0,
            frames: vec![],
            ts: None,
        });
        assert_eq!(empty.next_frame(), (Bytes::new(), 0));
    }

    #[test]
    fn test_sample_ts_clip() {
        // Counts measured with:
        // ffprobe -v error -count_frames -select_streams v:0 \
        //   -show_entries stream=nb_read_frames -of csv=p=0 videos/testcard.ts   (250)
        let clip = Clip::load(&videos().join("testcard.ts")).expect("sample ts clip loads");
        assert_eq!(clip.kind, MediaKind::Ts);
        assert_eq!(clip.frames.len(), 250);
        let t = clip.ts.as_ref().expect("ts timing");
        let keys: Vec<usize> = (0..250).filter(|&i| t.keyframes[i]).collect();
        assert_eq!(
            keys,
            [0, 50, 100, 150, 200],
            "one keyframe every 50 frames (-g 50)"
        );
        assert_eq!(t.loop_90k, 10 * 90_000, "10 s per play");
        assert!((clip.fps - 25.0).abs() < 1e-9, "{}", clip.fps);
        assert_eq!(clip.info().fps_milli, 25_000);
        for f in &clip.frames {
            assert_eq!(f.len() % ts::PACKET_LEN, 0);
        }
        // Paced by the PCR: on average 40 ms apart, never backwards.
        let last = *t.offsets.last().expect("offsets");
        let mean_ms = last as f64 / 27_000.0 / 249.0;
        assert!((mean_ms - 40.0).abs() < 4.0, "mean interval {mean_ms} ms");
        assert!(t.offsets.windows(2).all(|w| w[0] <= w[1]));
    }

    #[test]
    fn test_ts_loop_is_continuous() {
        let clip = Clip::load(&videos().join("testcard.ts")).expect("sample ts clip loads");
        let n = clip.frames.len();
        let mut src = ClipSource::new(clip);
        let mut cc: std::collections::HashMap<u16, u8> = std::collections::HashMap::new();
        let mut last_pcr: Option<u64> = None;
        let mut last_dts: std::collections::HashMap<u16, u64> = std::collections::HashMap::new();
        let mut last_due = Duration::ZERO;
        for i in 0..(2 * n + 10) {
            let f = src.next_timed();
            assert_eq!(f.flags & flags::DISCONTINUITY, 0, "ts loops are continuous");
            assert!(f.due >= last_due, "frame {i} due before the previous one");
            last_due = f.due;
            for pkt in f.data.chunks(ts::PACKET_LEN) {
                let p = ts::Packet::new(pkt).expect("whole packets");
                if p.has_payload() {
                    if let Some(prev) = cc.insert(p.pid(), p.cc()) {
                        assert_eq!(p.cc(), (prev + 1) & 15, "frame {i}: pid {:#x}", p.pid());
                    }
                }
                if let Some(pcr) = p.pcr() {
                    assert!(last_pcr.is_none_or(|l| pcr > l), "frame {i}: pcr goes back");
                    last_pcr = Some(pcr);
                }
                if p.pusi() {
                    if let Some(d) = ts::parse_pes(p.payload()).and_then(|h| h.decode_time()) {
                        if let Some(prev) = last_dts.insert(p.pid(), d) {
                            assert!(d > prev, "frame {i}: dts goes back on pid {:#x}", p.pid());
                        }
                    }
                }
            }
        }
        // Two plays took two loop lengths.
        let t = src.clip().ts.clone().expect("ts timing");
        assert!(last_due >= Duration::from_millis(2 * t.loop_90k / 90));
    }

    #[test]
    fn test_synthetic_ts_clip_drops_leading_non_keyframes() {
        let mut data = Vec::new();
        data.extend(ts::tests::pat(0));
        data.extend(ts::tests::pmt(0));
        let mut cc = 0;
        data.extend(ts::tests::video_au(
            &mut cc,
            122_400,
            false,
            Some((122_400 - 9000) * 300),
        ));
        let mut rest = ts::tests::stream(2, 5, true);
        // Renumber the video continuity counters after the leading frame.
        for pkt in rest.chunks_mut(ts::PACKET_LEN) {
            if ts::Packet::new(pkt).is_some_and(|p| p.pid() == 0x100) {
                pkt[3] = (pkt[3] & 0xf0) | ((pkt[3].wrapping_add(cc)) & 0x0f);
            }
        }
        data.extend(rest);
        let clip = Clip::from_ts("syn", &data).expect("valid ts");
        assert_eq!(clip.frames.len(), 10);
        let t = clip.ts.as_ref().expect("timing");
        assert!(t.keyframes[0] && t.keyframes[5]);
        assert_eq!(t.offsets[2] - t.offsets[1], 3600 * 300);
        assert!(matches!(
            Clip::from_ts("x", &ts::tests::stream(1, 1, true)[188..]),
            Err(FramingError::NoPsi) | Err(FramingError::NotTs)
        ));
    }
}
