//! What the end-to-end benchmarks need from the machine: Debian packages
//! (installed when missing, services not started), a scratch directory
//! and a sysctl, both undone on drop.

use std::path::{Path, PathBuf};

use anyhow::{Context as _, Result};
use xdplb_tests::RemoveOnDrop;

/// Installs the Debian packages (name, why) that are missing, without
/// starting their services: if the machine has no `policy-rc.d`, one that
/// denies every start is in place during the install (the servers run by
/// hand, in namespaces, with their own configuration).
pub fn ensure_packages(packages: &[(&str, &str)]) -> Result<()> {
    let installed = |p: &str| {
        std::process::Command::new("dpkg-query")
            .args(["-W", "-f=${Status}", p])
            .output()
            .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
    };
    if packages.iter().all(|(p, _)| installed(p)) {
        return Ok(());
    }
    let _deny = DenyServiceStarts::new()?;
    crate::harness::ensure_apt(packages)
}

const POLICY_RC_D: &str = "/usr/sbin/policy-rc.d";

/// A `policy-rc.d` denying service starts, if none exists; removed on drop.
struct DenyServiceStarts(Option<PathBuf>);

impl DenyServiceStarts {
    fn new() -> Result<Self> {
        if Path::new(POLICY_RC_D).exists() {
            return Ok(Self(None));
        }
        std::fs::write(POLICY_RC_D, "#!/bin/sh\nexit 101\n")?;
        std::fs::set_permissions(
            POLICY_RC_D,
            std::os::unix::fs::PermissionsExt::from_mode(0o755),
        )?;
        Ok(Self(Some(POLICY_RC_D.into())))
    }
}

impl Drop for DenyServiceStarts {
    fn drop(&mut self) {
        if let Some(p) = &self.0 {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// A scratch directory (mode 0755, so nginx workers can read it), removed
/// with its contents on drop.
pub struct TempDir(RemoveOnDrop);

impl TempDir {
    pub fn new(tag: &str) -> Result<Self> {
        let path = std::env::temp_dir().join(format!("xdplb-bench-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).with_context(|| format!("creating {}", path.display()))?;
        std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o755))?;
        Ok(Self(RemoveOnDrop(path)))
    }

    pub fn path(&self) -> &Path {
        &self.0 .0
    }
}

/// A host-wide sysctl (`/proc/sys/...` of the bench's own namespace) set
/// for the guard's lifetime and restored on drop.
pub struct Sysctl {
    path: PathBuf,
    old: String,
}

impl Sysctl {
    pub fn set(key: &str, value: &str) -> Result<Self> {
        let path = PathBuf::from("/proc/sys").join(key.replace('.', "/"));
        let old = std::fs::read_to_string(&path)
            .with_context(|| format!("reading {}", path.display()))?;
        std::fs::write(&path, value).with_context(|| format!("setting {key}={value}"))?;
        Ok(Self {
            path,
            old: old.trim().to_owned(),
        })
    }
}

impl Drop for Sysctl {
    fn drop(&mut self) {
        let _ = std::fs::write(&self.path, &self.old);
    }
}
