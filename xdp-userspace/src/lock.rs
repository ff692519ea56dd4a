//! One daemon per datapath: an exclusive `flock` on the pin directory.
//!
//! The lock is taken on the pin directory itself (bpffs holds no regular
//! files, but any directory can be flocked), before anything in it is
//! adopted, replaced or removed. The kernel drops the lock when its holder
//! exits or is killed, so there is never a stale lock to clean up, and
//! the holder's PID is read back from /proc/locks for the error message.

use std::{
    fs::{self, File, TryLockError},
    io,
    os::unix::fs::{DirBuilderExt as _, MetadataExt as _},
    path::{Path, PathBuf},
};

use thiserror::Error;

/// Why the pin directory could not be locked.
#[derive(Debug, Error)]
pub enum LockError {
    /// Another process holds the lock.
    #[error(
        "another xdplb daemon ({holder}) already drives the datapath pinned in {dir}; \
         stop it first (one daemon per pin directory)"
    )]
    Held { dir: PathBuf, holder: Holder },
    /// The directory could not be created, opened or locked.
    #[error("locking the pin directory {dir}: {source}")]
    Io { dir: PathBuf, source: io::Error },
}

/// Who holds a lock, as far as /proc/locks tells.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Holder(pub Option<u32>);

impl std::fmt::Display for Holder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            Some(pid) => write!(f, "PID {pid}"),
            None => f.write_str("PID unknown"),
        }
    }
}

/// An exclusive lock on a pin directory, released when dropped (or when
/// the process dies).
#[derive(Debug)]
pub struct PinDirLock {
    _dir: File,
}

impl PinDirLock {
    /// Creates `dir` if needed and locks it without waiting.
    pub fn acquire(dir: &Path) -> Result<Self, LockError> {
        let io_err = |source| LockError::Io {
            dir: dir.to_owned(),
            source,
        };
        loop {
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .map_err(io_err)?;
            let file = File::open(dir).map_err(io_err)?;
            // flock(LOCK_EX | LOCK_NB).
            match file.try_lock() {
                Ok(()) => {}
                Err(TryLockError::WouldBlock) => {
                    let holder = Holder(holder_pid(&file));
                    return Err(LockError::Held {
                        dir: dir.to_owned(),
                        holder,
                    });
                }
                Err(TryLockError::Error(err)) => return Err(io_err(err)),
            }
            // The previous holder may have removed the directory (SIGINT,
            // `detach --all`) between our open and our lock: then we locked
            // a deleted inode, and must lock the path's new directory.
            let locked = file.metadata().map_err(io_err)?;
            match fs::metadata(dir) {
                Ok(now) if now.dev() == locked.dev() && now.ino() == locked.ino() => {
                    return Ok(Self { _dir: file })
                }
                Ok(_) => continue,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(io_err(e)),
            }
        }
    }

    /// Whether some process holds the lock on `dir` (false if `dir` does
    /// not exist); `Some(holder)` if so.
    pub fn holder(dir: &Path) -> Result<Option<Holder>, LockError> {
        let io_err = |source| LockError::Io {
            dir: dir.to_owned(),
            source,
        };
        let file = match File::open(dir) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io_err(e)),
        };
        // flock(LOCK_SH | LOCK_NB).
        match file.try_lock_shared() {
            // Nobody holds it exclusively; ours goes with `file`.
            Ok(()) => Ok(None),
            Err(TryLockError::WouldBlock) => Ok(Some(Holder(holder_pid(&file)))),
            Err(TryLockError::Error(err)) => Err(io_err(err)),
        }
    }
}

/// The PID /proc/locks gives for the flock on `file`'s inode.
fn holder_pid(file: &File) -> Option<u32> {
    let meta = file.metadata().ok()?;
    let dev = meta.dev();
    // /proc/locks writes the device as MAJOR:MINOR in hex, then the inode.
    let (major, minor) = (libc::major(dev), libc::minor(dev));
    let wanted = format!("{major:02x}:{minor:02x}:{}", meta.ino());
    let text = fs::read_to_string("/proc/locks").ok()?;
    parse_holder(&text, &wanted)
}

/// The PID of the FLOCK line of /proc/locks whose `MAJ:MIN:INODE` is
/// `wanted`.
fn parse_holder(text: &str, wanted: &str) -> Option<u32> {
    text.lines().find_map(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        // "1: FLOCK ADVISORY WRITE 1234 00:27:17228 0 EOF"; blocked waiters
        // are listed as "1: -> FLOCK ..." and are skipped.
        match fields.as_slice() {
            [_, "FLOCK", _, "WRITE", pid, id, ..] if *id == wanted => pid.parse().ok(),
            _ => None,
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_writer_of_an_inode() {
        let text = "1: POSIX  ADVISORY  WRITE 99 00:27:17228 0 EOF\n\
                    2: FLOCK  ADVISORY  READ 98 00:27:17228 0 EOF\n\
                    3: FLOCK  ADVISORY  WRITE 13964 00:27:17228 0 EOF\n";
        assert_eq!(parse_holder(text, "00:27:17228"), Some(13964));
        assert_eq!(parse_holder(text, "00:27:1"), None);
    }

    /// Removes the test's directory however the test ends.
    struct RemoveDir(std::path::PathBuf);

    impl Drop for RemoveDir {
        fn drop(&mut self) {
            let _ = fs::remove_dir(&self.0);
        }
    }

    #[test]
    fn a_second_lock_is_refused_and_freed_with_the_first() {
        let dir = std::env::temp_dir().join(format!("xdplb-lock-{}", std::process::id()));
        let _cleanup = RemoveDir(dir.clone());
        let first = PinDirLock::acquire(&dir).unwrap();
        // flock locks belong to the open file: a second open conflicts
        // even within one process.
        match PinDirLock::acquire(&dir) {
            Err(LockError::Held { holder, .. }) => {
                assert_eq!(holder, Holder(Some(std::process::id())))
            }
            other => panic!("second lock: {other:?}"),
        }
        assert!(PinDirLock::holder(&dir).unwrap().is_some());
        drop(first);
        assert_eq!(PinDirLock::holder(&dir).unwrap(), None);
        let _again = PinDirLock::acquire(&dir).unwrap();
    }
}
