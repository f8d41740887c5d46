//! Clips loaded from files, and looping sources over them.

use std::fs;
use std::io::ErrorKind;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use ott_proto::{flags, MediaKind, StreamInfo};

use crate::error::{ClipError, FramingError};
use crate::mjpeg;

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
    /// The frames, in order; for MJPEG each is one whole JPEG image. Slices of one buffer.
    pub frames: Vec<Bytes>,
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
    pub fn load(path: &Path) -> Result<Self, ClipError> {
        let ext = path
            .extension()
            .and_then(|e| e.to_str())
            .map(str::to_ascii_lowercase);
        match ext.as_deref() {
            Some("mjpeg") => {}
            Some("ts") => {
                return Err(ClipError::Unsupported {
                    path: path.to_owned(),
                    what: "mpeg-ts",
                })
            }
            _ => {
                return Err(ClipError::Unsupported {
                    path: path.to_owned(),
                    what: "this file type (expected .mjpeg)",
                })
            }
        }
        let name = stream_name(path)?;
        let data = fs::read(path).map_err(|source| ClipError::Read {
            path: path.to_owned(),
            source,
        })?;
        let fps = read_sidecar(&path.with_extension("fps"))?;
        if data.is_empty() {
            return Err(ClipError::Empty {
                path: path.to_owned(),
            });
        }
        let clip = Self::from_mjpeg(name, fps, Bytes::from(data)).map_err(|source| {
            ClipError::Framing {
                path: path.to_owned(),
                source,
            }
        })?;
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

fn stream_name(path: &Path) -> Result<String, ClipError> {
    match path.file_stem().and_then(|s| s.to_str()) {
        Some(s) if !s.is_empty() => Ok(s.to_owned()),
        _ => Err(ClipError::BadName {
            path: path.to_owned(),
        }),
    }
}

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
/// anything else) is ignored. `.ts` clips are not supported yet: they are skipped with a
/// warning. A missing directory, a file instead of a directory, or a directory with no
/// clip is an error naming the path; a bad clip is an error naming the clip; two clips
/// with the same stem are an error naming both.
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
        let clip = match Clip::load(&path) {
            Ok(c) => c,
            Err(e @ ClipError::Unsupported { .. }) => {
                tracing::warn!(error = %e, "skipping clip");
                skipped += 1;
                continue;
            }
            Err(e) => return Err(e),
        };
        if let Some((first, _)) = clips.iter().find(|(_, c)| c.name == clip.name) {
            return Err(ClipError::DuplicateName {
                name: clip.name,
                first: first.clone(),
                second: path,
            });
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

/// A looping source over one clip.
///
/// Yields the clip's frames in order, forever. Every MJPEG frame carries
/// [`flags::KEYFRAME`]; the first frame after wrapping around also carries
/// [`flags::DISCONTINUITY`]. Timestamps come from a [`crate::Pacer`], not from here.
#[derive(Debug, Clone)]
pub struct ClipSource {
    clip: Arc<Clip>,
    next: usize,
    wrapped: bool,
}

impl ClipSource {
    /// A source starting at the clip's first frame.
    pub fn new(clip: impl Into<Arc<Clip>>) -> Self {
        Self {
            clip: clip.into(),
            next: 0,
            wrapped: false,
        }
    }

    /// The clip played.
    pub fn clip(&self) -> &Arc<Clip> {
        &self.clip
    }

    /// The next frame and its flags. A clip without frames (only possible for a `Clip`
    /// built by hand) yields empty frames with no flag.
    pub fn next_frame(&mut self) -> (Bytes, u8) {
        let Some(frame) = self.clip.frames.get(self.next) else {
            return (Bytes::new(), 0);
        };
        let mut f = match self.clip.kind {
            MediaKind::Mjpeg => flags::KEYFRAME,
            MediaKind::Ts => 0,
        };
        if self.wrapped && self.next == 0 {
            f |= flags::DISCONTINUITY;
        }
        let frame = frame.clone();
        self.next += 1;
        if self.next >= self.clip.frames.len() {
            self.next = 0;
            self.wrapped = true;
        }
        (frame, f)
    }
}

#[cfg(test)]
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
        assert_eq!(names, ["bars", "countdown"]);
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
        assert!(matches!(
            Clip::load(&ts),
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
        fs::write(d.join("a.ts"), [0x47u8; 188]).expect("write");
        let e = load_dir(&d).unwrap_err();
        assert!(matches!(e, ClipError::NoClips { skipped: 1, .. }), "{e}");

        fs::write(d.join("b.mjpeg"), tiny_jpeg(1)).expect("write");
        fs::write(d.join("c.mjpeg"), b"\xff\xd8\xff").expect("write");
        let e = load_dir(&d).unwrap_err();
        assert!(e.to_string().contains("c.mjpeg"), "{e}");

        fs::remove_file(d.join("c.mjpeg")).expect("remove");
        let clips = load_dir(&d).expect("loads");
        assert_eq!(clips.len(), 1);
        assert_eq!(clips[0].name, "b");
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
        });
        assert_eq!(empty.next_frame(), (Bytes::new(), 0));
    }
}
