//! A fresh per-run working directory for the wasm tier, filled before the program starts.
//!
//! The host writes only into a directory it just created and nothing else has seen: every file
//! and directory is created new (`O_EXCL`, `O_NOFOLLOW`), so no link planted by user code can
//! redirect a write (CVE-2024-28185). After the run the host never reads from it; it only
//! removes it (`remove_dir_all` does not follow symlinks).

use std::collections::BTreeMap;
use std::fs::{DirBuilder, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use switchyard_core::code::check_relative_path;

/// The directory; removed on drop.
pub struct Scratch {
    dir: tempfile::TempDir,
}

impl Scratch {
    /// Creates a private directory under `base` holding `files` (validated relative paths).
    pub fn create(base: &Path, files: &BTreeMap<String, Vec<u8>>) -> std::io::Result<Scratch> {
        std::fs::create_dir_all(base)?;
        let dir = tempfile::Builder::new().prefix("run-").tempdir_in(base)?;
        for (rel, content) in files {
            check_relative_path(rel)
                .map_err(|why| std::io::Error::new(std::io::ErrorKind::InvalidInput, why))?;
            let mut path = PathBuf::from(dir.path());
            let parts: Vec<&str> = rel.split('/').collect();
            for part in &parts[..parts.len() - 1] {
                path.push(part);
                match DirBuilder::new().mode(0o700).create(&path) {
                    Ok(()) => {}
                    // created for an earlier file of this run; it is ours and no link
                    Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                        if !std::fs::symlink_metadata(&path)?.is_dir() {
                            return Err(e);
                        }
                    }
                    Err(e) => return Err(e),
                }
            }
            path.push(parts[parts.len() - 1]);
            let mut f = OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .custom_flags(libc::O_NOFOLLOW)
                .open(&path)?;
            f.write_all(content)?;
        }
        Ok(Scratch { dir })
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_nested_files_and_removes_them() {
        let base = tempfile::tempdir().unwrap();
        let mut files = BTreeMap::new();
        files.insert("a/b/c.txt".to_string(), b"x".to_vec());
        files.insert("a/d.txt".to_string(), b"y".to_vec());
        let s = Scratch::create(base.path(), &files).unwrap();
        assert_eq!(std::fs::read(s.path().join("a/b/c.txt")).unwrap(), b"x");
        let p = s.path().to_path_buf();
        drop(s);
        assert!(!p.exists());
    }

    #[test]
    fn refuses_escaping_paths() {
        let base = tempfile::tempdir().unwrap();
        for bad in ["../x", "/etc/x", "a/../../x"] {
            let mut files = BTreeMap::new();
            files.insert(bad.to_string(), b"x".to_vec());
            assert!(Scratch::create(base.path(), &files).is_err(), "{bad}");
        }
    }
}
