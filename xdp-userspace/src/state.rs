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
//! The merged result is validated exactly like a file; the overlay is
//! written atomically (temporary file, fsync, rename) after each change.

use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    io::Write as _,
    net::SocketAddr,
    path::Path,
};

use anyhow::{Context as _, Result};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::{
    config::{Config, ConfigError},
    controller::Admin,
};

/// The operator's run-time changes.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Overlay {
    /// Services added through the API: `[[service]]` tables as JSON.
    #[serde(default)]
    pub added_services: Vec<Value>,
    /// Names of file services removed through the API.
    #[serde(default)]
    pub removed_services: BTreeSet<String>,
    /// Backends added through the API, per service name: `[[service.backend]]` tables as JSON.
    #[serde(default)]
    pub added_backends: BTreeMap<String, Vec<Value>>,
    /// Backends removed through the API, per service name.
    #[serde(default)]
    pub removed_backends: BTreeMap<String, BTreeSet<SocketAddr>>,
    /// Admin states set through the API, per service name and backend.
    #[serde(default)]
    pub admin: BTreeMap<String, BTreeMap<SocketAddr, Admin>>,
}

impl Overlay {
    /// Reads the overlay; a missing file is an empty overlay.
    pub fn load(path: &Path) -> Result<Self> {
        match fs::read(path) {
            Ok(bytes) => serde_json::from_slice(&bytes).with_context(|| {
                format!(
                    "state file {} is corrupt; move it away to start from the configuration alone",
                    path.display()
                )
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Self::default()),
            Err(e) => Err(e).with_context(|| format!("reading state file {}", path.display())),
        }
    }

    /// Writes the overlay atomically: a crash leaves the old file or the
    /// new one, never a torn one.
    pub fn save(&self, path: &Path) -> Result<()> {
        let dir = path.parent().context("state file has no directory")?;
        fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let tmp = path.with_extension("json.tmp");
        let mut f = fs::File::create(&tmp).with_context(|| format!("writing {}", tmp.display()))?;
        f.write_all(&serde_json::to_vec_pretty(self)?)?;
        f.sync_all()?;
        fs::rename(&tmp, path)
            .with_context(|| format!("renaming {} to {}", tmp.display(), path.display()))?;
        Ok(())
    }

    /// Adds (or replaces) a run-time service: a `[[service]]` table.
    pub fn add_service(&mut self, table: Value) -> String {
        let name = table["name"].as_str().unwrap_or_default().to_owned();
        self.removed_services.remove(&name);
        self.added_services.retain(|s| s["name"] != table["name"]);
        self.added_services.push(table);
        name
    }

    /// Removes a service, whether it came from the file or the API.
    pub fn remove_service(&mut self, name: &str) {
        self.added_services
            .retain(|s| s["name"].as_str() != Some(name));
        self.added_backends.remove(name);
        self.removed_backends.remove(name);
        self.admin.remove(name);
        self.removed_services.insert(name.to_owned());
    }

    /// Adds a run-time backend (a `[[service.backend]]` table) to a service
    /// listening on `service_port`; returns its address.
    pub fn add_backend(
        &mut self,
        service: &str,
        table: Value,
        service_port: u16,
    ) -> Option<SocketAddr> {
        let addr = backend_addr(&table, service_port)?;
        if let Some(removed) = self.removed_backends.get_mut(service) {
            removed.remove(&addr);
        }
        self.added_backends
            .entry(service.to_owned())
            .or_default()
            .push(table);
        Some(addr)
    }

    /// Removes a backend, whether it came from the file or the API.
    pub fn remove_backend(&mut self, service: &str, addr: SocketAddr, service_port: u16) {
        let added = self.added_backends.entry(service.to_owned()).or_default();
        let before = added.len();
        added.retain(|b| backend_addr(b, service_port) != Some(addr));
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

    /// The file's configuration with this overlay applied, validated.
    /// Overlay entries that the file now supersedes are dropped from
    /// `self`.
    pub fn merge(&mut self, file: &Config) -> Result<Config, ConfigError> {
        let mut doc = serde_json::to_value(file).expect("a Config serializes");
        let services = doc["service"].as_array_mut().expect("service is an array");
        let file_names: BTreeSet<String> = file.services.iter().map(|s| s.name.clone()).collect();

        services.retain(|s| {
            !self
                .removed_services
                .contains(s["name"].as_str().unwrap_or_default())
        });
        self.removed_services.retain(|n| file_names.contains(n));
        self.added_services
            .retain(|s| !file_names.contains(s["name"].as_str().unwrap_or_default()));
        services.extend(self.added_services.iter().cloned());

        for service in services.iter_mut() {
            let name = service["name"].as_str().unwrap_or_default().to_owned();
            let port = service["port"]
                .as_u64()
                .and_then(|p| u16::try_from(p).ok())
                .unwrap_or_default();
            let backends = service
                .as_object_mut()
                .expect("a service is a table")
                .entry("backend")
                .or_insert_with(|| json!([]))
                .as_array_mut()
                .expect("backend is an array");
            let key = |b: &Value| backend_addr(b, port);
            let present: BTreeSet<SocketAddr> = backends.iter().filter_map(key).collect();
            if let Some(added) = self.added_backends.get_mut(&name) {
                added.retain(|b| key(b).is_some_and(|k| !present.contains(&k)));
                backends.extend(added.iter().cloned());
            }
            if let Some(removed) = self.removed_backends.get(&name) {
                backends.retain(|b| key(b).is_none_or(|k| !removed.contains(&k)));
            }
            if let Some(admin) = self.admin.get(&name) {
                for b in backends.iter_mut() {
                    if let Some(state) = key(b).and_then(|k| admin.get(&k)) {
                        b["state"] = json!(state.name());
                    }
                }
            }
        }
        let text = toml::to_string(&doc).expect("JSON of a Config is TOML");
        Config::parse(&text, "configuration with run-time changes")
    }
}

/// A `[[service.backend]]` table's `address:port` (the port defaults to
/// the service's).
fn backend_addr(table: &Value, service_port: u16) -> Option<SocketAddr> {
    let ip = table["address"].as_str()?.parse().ok()?;
    let port = match table.get("port") {
        Some(p) => u16::try_from(p.as_u64()?).ok()?,
        None => service_port,
    };
    Some(SocketAddr::new(ip, port))
}

#[cfg(test)]
mod tests {
    use super::*;

    const FILE: &str = r#"
[[service]]
name = "web"
vip = "10.0.0.100"
port = 80
protocol = "tcp"
[[service.backend]]
address = "10.0.0.11"
[[service.backend]]
address = "10.0.0.12"
"#;

    fn file() -> Config {
        Config::parse(FILE, "test.toml").unwrap()
    }

    #[test]
    fn empty_overlay_is_the_file() {
        assert_eq!(Overlay::default().merge(&file()).unwrap(), file());
    }

    #[test]
    fn added_removed_and_drained() {
        let mut o = Overlay::default();
        o.added_backends.insert(
            "web".into(),
            vec![json!({"address": "10.0.0.13", "weight": 50})],
        );
        o.removed_backends.insert(
            "web".into(),
            BTreeSet::from(["10.0.0.11:80".parse().unwrap()]),
        );
        o.admin.insert(
            "web".into(),
            BTreeMap::from([("10.0.0.12:80".parse().unwrap(), Admin::Drain)]),
        );
        o.added_services
            .push(json!({"name": "dns", "vip": "10.0.0.53", "port": 53, "protocol": "udp"}));
        let merged = o.merge(&file()).unwrap();
        let web = &merged.services[0];
        let addrs: Vec<String> = web
            .backends
            .iter()
            .map(|b| format!("{}/{}/{:?}", b.address, b.weight, b.state))
            .collect();
        assert_eq!(addrs, ["10.0.0.12/100/Drain", "10.0.0.13/50/Up"]);
        assert_eq!(merged.services[1].name, "dns");
    }

    #[test]
    fn the_file_wins_over_stale_overlay_entries() {
        let mut o = Overlay::default();
        o.added_backends.insert(
            "web".into(),
            vec![json!({"address": "10.0.0.11", "weight": 7})],
        );
        o.added_services
            .push(json!({"name": "web", "vip": "10.0.0.1", "port": 81, "protocol": "tcp"}));
        let merged = o.merge(&file()).unwrap();
        assert_eq!(merged, file());
        assert!(o.added_services.is_empty() && o.added_backends["web"].is_empty());
    }

    #[test]
    fn an_invalid_addition_is_refused_by_validation() {
        let mut o = Overlay::default();
        o.added_backends.insert(
            "web".into(),
            vec![json!({"address": "10.0.0.13", "weight": 20000})],
        );
        let err = o.merge(&file()).unwrap_err();
        assert!(err.to_string().contains("weight"), "{err}");
    }

    #[test]
    fn save_then_load_round_trips_atomically() {
        let dir = std::env::temp_dir().join(format!("xdplb-state-test-{}", std::process::id()));
        let path = dir.join("state.json");
        let mut o = Overlay::default();
        o.removed_services.insert("web".into());
        o.save(&path).unwrap();
        assert_eq!(Overlay::load(&path).unwrap(), o);
        assert!(!path.with_extension("json.tmp").exists());
        fs::remove_dir_all(&dir).unwrap();
        assert_eq!(Overlay::load(&path).unwrap(), Overlay::default());
    }
}
