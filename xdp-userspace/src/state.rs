//! Run-time changes made through the API, persisted so they survive a
//! daemon restart.
//!
//! How the configuration file and run-time changes combine: the file is the
//! base; the state file is an overlay of the operator's changes on top of
//! it, re-applied on every start and reload:
//! - services and backends added through the API are added to the file's
//!   (when the file itself gains a service of the same name, or a backend
//!   at the same address and port, the file's version wins and the overlay
//!   entry is dropped);
//! - services and backends removed through the API are removed from it;
//! - drain/undrain set a backend's admin state, overriding its `state` in
//!   the file.
//!
//! The overlay holds the same [`ServiceSpec`]s and [`BackendSpec`]s as the
//! file and the API; the merged result is validated exactly like a file.
//! A new overlay is first [staged](Overlay::stage) (written to a temporary
//! file and flushed to disk), then [committed](Staged::commit) by a rename,
//! so the daemon can apply a change between the two steps and never persist
//! what it could not apply, nor apply what it could not persist.
//!
//! A state file written by a newer xdplb may hold fields this version does
//! not know; it is refused (naming the field and both versions) rather than
//! read in part, because the next save would silently drop those changes.

use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    io::Write as _,
    net::SocketAddr,
    path::{Path, PathBuf},
};

use anyhow::{bail, Context as _, Result};
use serde::{Deserialize, Serialize};

use crate::config::{Admin, BackendSpec, Config, ConfigError, ServiceConfig, ServiceSpec};

/// The operator's run-time changes.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Overlay {
    /// The version of xdplb that wrote the file (absent in older files).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    written_by: Option<String>,
    /// Services added through the API.
    #[serde(default)]
    added_services: Vec<ServiceSpec>,
    /// Names of file services removed through the API.
    #[serde(default)]
    removed_services: BTreeSet<String>,
    /// Backends added through the API, per service name.
    #[serde(default)]
    added_backends: BTreeMap<String, Vec<BackendSpec>>,
    /// Backends removed through the API, per service name.
    #[serde(default)]
    removed_backends: BTreeMap<String, BTreeSet<SocketAddr>>,
    /// Admin states set through the API, per service name and backend.
    #[serde(default)]
    admin: BTreeMap<String, BTreeMap<SocketAddr, Admin>>,
}

/// A new state file written to a temporary file and flushed, not yet in
/// place. Dropping it without [`Staged::commit`] removes the temporary
/// file: the state file stays as it was.
pub struct Staged {
    tmp: PathBuf,
    path: PathBuf,
    committed: bool,
}

impl Staged {
    /// Puts the staged file in place of the state file (a rename: a crash
    /// leaves the old file or the new one, never a torn one).
    pub fn commit(mut self) -> Result<()> {
        fs::rename(&self.tmp, &self.path).with_context(|| {
            format!("renaming {} to {}", self.tmp.display(), self.path.display())
        })?;
        self.committed = true;
        // The rename is durable once the directory is.
        if let Some(dir) = self.path.parent() {
            fs::File::open(dir).and_then(|d| d.sync_all()).ok();
        }
        Ok(())
    }
}

impl Drop for Staged {
    fn drop(&mut self) {
        if !self.committed {
            let _ = fs::remove_file(&self.tmp);
        }
    }
}

impl Overlay {
    /// Reads the overlay; a missing file is an empty overlay.
    pub fn load(path: &Path) -> Result<Self> {
        let bytes = match fs::read(path) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Self::default()),
            read => read.with_context(|| format!("reading state file {}", path.display()))?,
        };
        let mut de = serde_json::Deserializer::from_slice(&bytes);
        let err = match serde_path_to_error::deserialize::<_, Self>(&mut de) {
            Ok(overlay) => {
                de.end()
                    .with_context(|| format!("state file {} is corrupt", path.display()))?;
                // serde also reads a struct from an array, by position: `[]`
                // would pass for an empty overlay, silently.
                if !bytes.trim_ascii_start().starts_with(b"{") {
                    bail!(
                        "state file {} is corrupt: it is not a JSON object; move it away to \
                         start from the configuration alone",
                        path.display()
                    );
                }
                return Ok(overlay);
            }
            Err(err) => err,
        };
        let at = err.path().to_string();
        if err.inner().to_string().starts_with("unknown field") {
            // Which xdplb wrote it, if the file says so.
            #[derive(Deserialize)]
            struct Version {
                written_by: Option<String>,
            }
            let writer = serde_json::from_slice::<Version>(&bytes)
                .ok()
                .and_then(|v| v.written_by)
                .unwrap_or_else(|| "an unknown version".into());
            bail!(
                "state file {}: {at}: {} (this is xdplb {}, the file was written by xdplb \
                 {writer}); run that version, or move the file away to start from the \
                 configuration alone",
                path.display(),
                err.inner(),
                env!("CARGO_PKG_VERSION"),
            );
        }
        bail!(
            "state file {} is corrupt at {at}: {}; move it away to start from the \
             configuration alone",
            path.display(),
            err.inner()
        )
    }

    /// Writes the overlay next to `path` and flushes it to disk, without
    /// replacing `path` yet.
    pub fn stage(&self, path: &Path) -> Result<Staged> {
        let dir = path.parent().context("state file has no directory")?;
        fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let staged = Staged {
            tmp: path.with_extension("json.tmp"),
            path: path.to_owned(),
            committed: false,
        };
        let write = || -> std::io::Result<()> {
            let mut f = fs::File::create(&staged.tmp)?;
            let versioned = Self {
                written_by: Some(env!("CARGO_PKG_VERSION").into()),
                ..self.clone()
            };
            f.write_all(&serde_json::to_vec_pretty(&versioned)?)?;
            f.sync_all()
        };
        write().with_context(|| format!("writing {}", staged.tmp.display()))?;
        Ok(staged)
    }

    /// Adds (or replaces) a run-time service; returns its name. A file
    /// service of that name removed at run time stays removed: this one
    /// takes its place.
    pub fn add_service(&mut self, spec: ServiceSpec) -> String {
        let name = spec.name.clone();
        self.added_services.retain(|s| s.name != name);
        self.added_services.push(spec);
        name
    }

    /// Whether `name` is a service added through the API.
    pub fn adds_service(&self, name: &str) -> bool {
        self.added_services.iter().any(|s| s.name == name)
    }

    /// Removes a service, whether it came from the file or the API.
    pub fn remove_service(&mut self, name: &str) {
        self.added_services.retain(|s| s.name != name);
        self.added_backends.remove(name);
        self.removed_backends.remove(name);
        self.admin.remove(name);
        self.removed_services.insert(name.to_owned());
    }

    /// Adds a run-time backend to a service listening on `service_port`;
    /// returns its address. A file backend of that address removed at run
    /// time stays removed: this one takes its place.
    pub fn add_backend(
        &mut self,
        service: &str,
        spec: BackendSpec,
        service_port: u16,
    ) -> SocketAddr {
        let addr = spec.addr(service_port);
        self.added_backends
            .entry(service.to_owned())
            .or_default()
            .push(spec);
        addr
    }

    /// Removes a backend, whether it came from the file or the API.
    pub fn remove_backend(&mut self, service: &str, addr: SocketAddr, service_port: u16) {
        let added = self.added_backends.entry(service.to_owned()).or_default();
        let before = added.len();
        added.retain(|b| b.addr(service_port) != addr);
        if added.len() == before {
            self.removed_backends
                .entry(service.to_owned())
                .or_default()
                .insert(addr);
        }
        if let Some(admin) = self.admin.get_mut(service) {
            admin.remove(&addr);
        }
    }

    /// Sets a backend's admin state.
    pub fn set_admin(&mut self, service: &str, addr: SocketAddr, admin: Admin) {
        self.admin
            .entry(service.to_owned())
            .or_default()
            .insert(addr, admin);
    }

    /// True when the overlay holds no run-time change (entries emptied by
    /// later changes count as none).
    fn changes_nothing(&self) -> bool {
        self.added_services.is_empty()
            && self.removed_services.is_empty()
            && self.added_backends.values().all(Vec::is_empty)
            && self.removed_backends.values().all(BTreeSet::is_empty)
            && self.admin.values().all(BTreeMap::is_empty)
    }

    /// The file's configuration with this overlay applied, validated.
    /// Overlay entries that the file now supersedes are dropped from
    /// `self`.
    pub fn merge(&mut self, file: &Config) -> Result<Config, ConfigError> {
        // The file was validated when it was read; with nothing to add,
        // validating 10,000 backends again would only slow every reload.
        if self.changes_nothing() {
            return Ok(file.clone());
        }
        let in_file: BTreeSet<&str> = file.services.iter().map(|s| s.name.as_str()).collect();
        self.removed_services
            .retain(|n| in_file.contains(n.as_str()));
        self.added_services.retain(|s| {
            !in_file.contains(s.name.as_str()) || self.removed_services.contains(&s.name)
        });
        let mut specs: Vec<ServiceSpec> = file
            .services
            .iter()
            .filter(|s| !self.removed_services.contains(&s.name))
            .map(ServiceConfig::spec)
            .chain(self.added_services.iter().cloned())
            .collect();
        for spec in &mut specs {
            let port = spec.port;
            if let Some(removed) = self.removed_backends.get(&spec.name) {
                spec.backends.retain(|b| !removed.contains(&b.addr(port)));
            }
            if let Some(added) = self.added_backends.get_mut(&spec.name) {
                let present: BTreeSet<SocketAddr> =
                    spec.backends.iter().map(|b| b.addr(port)).collect();
                added.retain(|b| !present.contains(&b.addr(port)));
                spec.backends.extend(added.iter().cloned());
            }
            if let Some(admin) = self.admin.get(&spec.name) {
                for b in &mut spec.backends {
                    if let Some(&state) = admin.get(&b.addr(port)) {
                        b.state = Some(state);
                    }
                }
            }
        }
        Config::from_specs(
            file.daemon.clone(),
            file.cluster.clone(),
            specs,
            "configuration with run-time changes",
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FILE: &str = "[[service]]\nname = \"web\"\nvip = \"10.0.0.100\"\nport = 80\n\
                        protocol = \"tcp\"\n[[service.backend]]\naddress = \"10.0.0.11\"\n\
                        [[service.backend]]\naddress = \"10.0.0.12\"\n";

    fn file() -> Config {
        Config::parse(FILE, "test.toml").unwrap()
    }

    fn backend(address: &str, weight: u32) -> BackendSpec {
        BackendSpec {
            address: address.parse().unwrap(),
            port: None,
            weight: Some(weight),
            state: None,
        }
    }

    fn service(name: &str, vip: &str, port: u16) -> ServiceSpec {
        serde_json::from_value(serde_json::json!(
            {"name": name, "vip": vip, "port": port, "protocol": "udp"}
        ))
        .unwrap()
    }

    /// A scratch directory, removed when dropped.
    struct Scratch(PathBuf);

    impl Scratch {
        fn new(name: &str) -> Self {
            let dir =
                std::env::temp_dir().join(format!("xdplb-state-{name}-{}", std::process::id()));
            let _ = fs::remove_dir_all(&dir);
            Self(dir)
        }
    }

    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    #[test]
    fn empty_overlay_is_the_file() {
        assert_eq!(Overlay::default().merge(&file()).unwrap(), file());
    }

    #[test]
    fn added_removed_and_drained() {
        let mut o = Overlay::default();
        o.add_backend("web", backend("10.0.0.13", 50), 80);
        o.remove_backend("web", "10.0.0.11:80".parse().unwrap(), 80);
        o.set_admin("web", "10.0.0.12:80".parse().unwrap(), Admin::Drain);
        o.add_service(service("dns", "10.0.0.53", 53));
        let merged = o.merge(&file()).unwrap();
        let web = &merged.services[0];
        let addrs: Vec<String> = web
            .backends
            .iter()
            .map(|b| format!("{}/{}/{}", b.address, b.weight, b.state))
            .collect();
        assert_eq!(addrs, ["10.0.0.12/100/drain", "10.0.0.13/50/up"]);
        assert_eq!(merged.services[1].name, "dns");
    }

    #[test]
    fn the_file_wins_over_stale_overlay_entries() {
        let mut o = Overlay::default();
        o.add_backend("web", backend("10.0.0.11", 7), 80);
        o.add_service(service("web", "10.0.0.1", 81));
        let merged = o.merge(&file()).unwrap();
        assert_eq!(merged, file());
        assert!(o.added_services.is_empty() && o.added_backends["web"].is_empty());
    }

    #[test]
    fn what_replaces_a_removed_file_entry_is_kept() {
        let mut o = Overlay::default();
        o.remove_service("web");
        o.add_service(service("web", "10.0.0.1", 81));
        let merged = o.merge(&file()).unwrap();
        assert_eq!((merged.services.len(), merged.services[0].port), (1, 81));

        let mut o = Overlay::default();
        let b11 = "10.0.0.11:80".parse().unwrap();
        o.remove_backend("web", b11, 80);
        o.add_backend("web", backend("10.0.0.11", 7), 80);
        let web = &o.merge(&file()).unwrap().services[0];
        let weights: Vec<(SocketAddr, u32)> = (web.backends.iter())
            .map(|b| (SocketAddr::new(b.address, b.port), b.weight))
            .collect();
        assert_eq!(weights, [("10.0.0.12:80".parse().unwrap(), 100), (b11, 7)]);
        // Removing the replacement leaves the file's removed too.
        o.remove_backend("web", b11, 80);
        assert_eq!(o.merge(&file()).unwrap().services[0].backends.len(), 1);
    }

    #[test]
    fn an_invalid_addition_is_refused_by_validation() {
        let mut o = Overlay::default();
        o.add_backend("web", backend("10.0.0.13", 20000), 80);
        let err = o.merge(&file()).unwrap_err();
        assert!(err.to_string().contains("weight"), "{err}");
    }

    #[test]
    fn save_then_load_round_trips_atomically() {
        let dir = Scratch::new("roundtrip");
        let path = dir.0.join("state.json");
        let mut o = Overlay::default();
        o.remove_service("web");
        o.add_backend("api", backend("10.0.0.13", 5), 80);
        o.stage(&path).unwrap().commit().unwrap();
        let mut loaded = Overlay::load(&path).unwrap();
        assert_eq!(
            loaded.written_by.take().as_deref(),
            Some(env!("CARGO_PKG_VERSION"))
        );
        assert_eq!(loaded, o);
        assert!(!path.with_extension("json.tmp").exists());
        fs::remove_file(&path).unwrap();
        assert_eq!(Overlay::load(&path).unwrap(), Overlay::default());
    }

    #[test]
    fn a_staged_change_not_committed_leaves_the_file_as_it_was() {
        let dir = Scratch::new("staged");
        let path = dir.0.join("state.json");
        Overlay::default().stage(&path).unwrap().commit().unwrap();
        let mut o = Overlay::default();
        o.remove_service("web");
        let staged = o.stage(&path).unwrap();
        assert_eq!(Overlay::load(&path).unwrap().removed_services.len(), 0);
        drop(staged);
        assert!(!path.with_extension("json.tmp").exists());
        o.stage(&path).unwrap().commit().unwrap();
        assert_eq!(Overlay::load(&path).unwrap().removed_services.len(), 1);
    }

    #[test]
    fn a_field_from_a_newer_version_is_refused_by_name() {
        let dir = Scratch::new("newer");
        let path = dir.0.join("state.json");
        fs::create_dir_all(&dir.0).unwrap();
        fs::write(
            &path,
            r#"{"written_by": "9.0.0", "added_backends": {"web": [
                {"address": "10.0.0.13", "weight": 5, "max_conns": 10}]}}"#,
        )
        .unwrap();
        let err = format!("{:#}", Overlay::load(&path).unwrap_err());
        for needle in [
            "added_backends.web[0]",
            "unknown field `max_conns`",
            "written by xdplb 9.0.0",
            env!("CARGO_PKG_VERSION"),
        ] {
            assert!(err.contains(needle), "{needle:?} missing: {err}");
        }
        assert_eq!(err.lines().count(), 1, "{err}");
        fs::write(&path, "{\"admin\": 7}").unwrap();
        let err = format!("{:#}", Overlay::load(&path).unwrap_err());
        assert!(err.contains("is corrupt at admin"), "{err}");
    }

    #[test]
    fn valid_json_that_is_not_an_object_is_refused() {
        let dir = Scratch::new("shape");
        let path = dir.0.join("state.json");
        fs::create_dir_all(&dir.0).unwrap();
        for text in ["[]", " [\"0.1.0\"]", "null", "7", "\"x\""] {
            fs::write(&path, text).unwrap();
            let err = format!("{:#}", Overlay::load(&path).unwrap_err());
            assert!(err.contains("is corrupt"), "{text}: {err}");
        }
        fs::write(&path, " {}").unwrap();
        assert_eq!(Overlay::load(&path).unwrap(), Overlay::default());
    }
}
