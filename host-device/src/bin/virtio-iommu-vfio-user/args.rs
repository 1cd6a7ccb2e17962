//! The command line.

use std::path::PathBuf;

use log::LevelFilter;

/// One line of usage.
pub const USAGE: &str = "usage: virtio-iommu-vfio-user --iommu SOCK [--blk SOCK --disk PATH \
--blk-endpoint ID] [--edu SOCK --edu-endpoint ID] [--checker] \
[--log-level error|warn|info|debug|trace]";

/// The parsed arguments.
#[derive(Debug, PartialEq, Eq)]
pub struct Args {
    /// The virtio-iommu's socket.
    pub iommu: PathBuf,
    /// virtio-blk: socket, disk image, endpoint ID.
    pub blk: Option<(PathBuf, PathBuf, u32)>,
    /// edu: socket, endpoint ID.
    pub edu: Option<(PathBuf, u32)>,
    /// `--log-level` (default warn).
    pub level: LevelFilter,
    /// `--checker`: the IOMMU's driver checker on (its report printed at exit).
    pub checker: bool,
}

/// An endpoint ID in decimal or `0x` hex.
fn parse_id(s: &str) -> Result<u32, String> {
    let r = match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        Some(hex) => u32::from_str_radix(hex, 16),
        None => s.parse(),
    };
    r.map_err(|_| format!("bad endpoint ID {s:?}"))
}

/// Parses the arguments after the program name.
///
/// # Errors
/// A message naming the bad or missing argument.
pub fn parse(mut it: impl Iterator<Item = String>) -> Result<Args, String> {
    let (mut iommu, mut blk, mut disk, mut blk_ep, mut edu, mut edu_ep) =
        (None, None, None, None, None, None);
    let mut level = LevelFilter::Warn;
    let mut checker = false;
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or(format!("{flag} needs a value"));
        match flag.as_str() {
            "--iommu" => iommu = Some(PathBuf::from(value()?)),
            "--blk" => blk = Some(PathBuf::from(value()?)),
            "--disk" => disk = Some(PathBuf::from(value()?)),
            "--blk-endpoint" => blk_ep = Some(parse_id(&value()?)?),
            "--edu" => edu = Some(PathBuf::from(value()?)),
            "--edu-endpoint" => edu_ep = Some(parse_id(&value()?)?),
            "--checker" => checker = true,
            "--log-level" => {
                level = match value()?.as_str() {
                    "error" => LevelFilter::Error,
                    "warn" => LevelFilter::Warn,
                    "info" => LevelFilter::Info,
                    "debug" => LevelFilter::Debug,
                    "trace" => LevelFilter::Trace,
                    other => return Err(format!("bad log level {other:?}")),
                }
            }
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    let iommu = iommu.ok_or("--iommu SOCK is required")?;
    let blk = match (blk, disk, blk_ep) {
        (Some(s), Some(d), Some(e)) => Some((s, d, e)),
        (None, None, None) => None,
        _ => return Err("--blk, --disk and --blk-endpoint go together".into()),
    };
    let edu = match (edu, edu_ep) {
        (Some(s), Some(e)) => Some((s, e)),
        (None, None) => None,
        _ => return Err("--edu and --edu-endpoint go together".into()),
    };
    if let (Some((_, _, b)), Some((_, e))) = (&blk, &edu) {
        if b == e {
            return Err("blk and edu need different endpoint IDs".into());
        }
    }
    Ok(Args {
        iommu,
        blk,
        edu,
        level,
        checker,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(args: &[&str]) -> Result<Args, String> {
        parse(args.iter().map(|s| s.to_string()))
    }

    #[test]
    fn the_runners_command_line() {
        let a = p(&[
            "--iommu",
            "/t/i.sock",
            "--blk",
            "/t/b.sock",
            "--disk",
            "/t/d.img",
            "--blk-endpoint",
            "16",
            "--edu",
            "/t/e.sock",
            "--edu-endpoint",
            "0x18",
            "--log-level",
            "debug",
            "--checker",
        ])
        .unwrap();
        assert_eq!(a.iommu, PathBuf::from("/t/i.sock"));
        assert_eq!(a.blk, Some(("/t/b.sock".into(), "/t/d.img".into(), 16)));
        assert_eq!(a.edu, Some(("/t/e.sock".into(), 0x18)));
        assert_eq!(a.level, LevelFilter::Debug);
        assert!(a.checker);
        let plain = p(&["--iommu", "x"]).unwrap();
        assert_eq!(plain.level, LevelFilter::Warn);
        assert!(!plain.checker);
    }

    #[test]
    fn bad_command_lines() {
        for bad in [
            &[][..],
            &["--edu", "e", "--edu-endpoint", "8"],
            &["--iommu"],
            &["--iommu", "i", "--blk", "b"],
            &["--iommu", "i", "--edu", "e"],
            &["--iommu", "i", "--edu", "e", "--edu-endpoint", "-1"],
            &[
                "--iommu",
                "i",
                "--edu",
                "e",
                "--edu-endpoint",
                "0x1_0000_0000",
            ],
            &["--iommu", "i", "--log-level", "loud"],
            &["--iommu", "i", "--what"],
            &["--iommu", "i", "--checker=on"],
            &[
                "--iommu",
                "i",
                "--blk",
                "b",
                "--disk",
                "d",
                "--blk-endpoint",
                "8",
                "--edu",
                "e",
                "--edu-endpoint",
                "8",
            ],
        ] {
            assert!(p(bad).is_err(), "{bad:?}");
        }
    }
}
