//! Loading the embedded XDP program, adopting pinned maps, attaching to
//! interfaces.

use std::{
    ffi::CString,
    fs,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
};

use anyhow::{bail, Context as _, Result};
use aya::{
    maps::{MapInfo, MapType},
    programs::{
        links::{FdLink, PinnedLink},
        xdp::{XdpLink, XdpLinkId},
        Xdp, XdpMode,
    },
    Ebpf, EbpfLoader,
};
use netlink_packet_route::{
    link::{LinkAttribute, LinkMessage, LinkXdp},
    RouteNetlinkMessage,
};
use tracing::warn;
use xdp_common::{map_names as names, *};

use crate::{
    program::{OBJECT, PASSTHROUGH_OBJECT, PASS_PROGRAM, PROGRAM_NAME},
    rtnl::Rtnl,
};

/// Where bpffs is normally mounted.
pub const BPFFS: &str = "/sys/fs/bpf";
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

/// How to attach the program to an interface.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum AttachMode {
    /// Native (driver) mode, falling back to generic mode with a warning.
    Auto,
    /// Native mode only: fail if the driver lacks XDP support.
    Native,
    /// Generic (skb) mode: works everywhere, slower.
    Generic,
}

/// The mode an attachment ended up in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Attached {
    Native,
    Generic,
    /// Took over the link an earlier daemon pinned (its mode unchanged).
    Adopted,
}

impl Attached {
    pub fn name(self) -> &'static str {
        match self {
            Attached::Native => "native",
            Attached::Generic => "generic",
            Attached::Adopted => "adopted",
        }
    }
}

/// A pinned map's kernel shape: (name, type, key size, value size, max entries).
type MapShape = (&'static str, MapType, usize, usize, u32);

/// The shape of map `name` with keys `K` and values `V`.
fn shape<K, V>(name: &'static str, kind: MapType, max: u32) -> MapShape {
    (name, kind, size_of::<K>(), size_of::<V>(), max)
}

/// Expected kernel shape of every pinned map. The same types define the
/// maps in xdp-ebpf, so a pinned map that differs was made by an
/// incompatible build.
fn expected_maps() -> [MapShape; 12] {
    [
        shape::<ServiceKey, Service>(names::SERVICES, MapType::Hash, MAX_SERVICES),
        shape::<u32, Backend>(names::BACKENDS, MapType::Array, MAX_BACKENDS),
        shape::<u32, u32>(names::MAGLEV, MapType::Array, MAGLEV_SLOTS),
        shape::<FlowKey, Flow>(names::FLOWS, MapType::LruHash, MAX_FLOWS),
        shape::<u32, u64>(names::REASONS, MapType::PerCpuArray, REASON_COUNT),
        shape::<u32, Counters>(names::SERVICE_STATS, MapType::PerCpuArray, MAX_SERVICES),
        shape::<u32, Counters>(names::BACKEND_STATS, MapType::PerCpuArray, MAX_BACKENDS),
        (names::TX_PORTS, MapType::DevMapHash, 4, 8, MAX_TX_PORTS),
        shape::<FlowKey, NatFwd>(names::NAT_FWD, MapType::Hash, MAX_NAT_FLOWS),
        shape::<FlowKey, NatRev>(names::NAT_REV, MapType::Hash, MAX_NAT_FLOWS),
        shape::<u32, Globals>(names::GLOBALS, MapType::Array, 1),
        shape::<ifmac::IfMacKey, u32>(ifmac::MAP_NAME, MapType::Hash, ifmac::MAX_IF_MACS),
    ]
}

/// Mounts bpffs on /sys/fs/bpf unless `dir` already lies on a bpffs.
/// Returns whether it mounted one.
pub fn ensure_bpffs(dir: &Path) -> Result<bool> {
    let on_bpffs = |p: &Path| -> bool {
        let Ok(c) = CString::new(p.as_os_str().as_encoded_bytes()) else {
            return false;
        };
        let mut st: libc::statfs = unsafe { std::mem::zeroed() };
        // SAFETY: valid C string and out-pointer.
        unsafe { libc::statfs(c.as_ptr(), &mut st) == 0 && st.f_type as i64 == BPF_FS_MAGIC }
    };
    let probe = dir
        .ancestors()
        .find(|p| p.exists())
        .unwrap_or(Path::new("/"));
    if on_bpffs(probe) {
        return Ok(false);
    }
    if !dir.starts_with(BPFFS) {
        bail!("pin directory {} is not on a bpf filesystem", dir.display());
    }
    fs::create_dir_all(BPFFS).with_context(|| format!("creating {BPFFS}"))?;
    let (src, target, fstype) = (c"bpf", CString::new(BPFFS)?, c"bpf");
    // SAFETY: valid C strings; no data argument.
    let rc = unsafe {
        libc::mount(
            src.as_ptr(),
            target.as_ptr(),
            fstype.as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        bail!(
            "mounting bpffs on {BPFFS}: {}",
            std::io::Error::last_os_error()
        );
    }
    Ok(true)
}

/// Refuses a pin directory on a bpffs that the host cannot see. Under
/// `ip netns exec` the daemon runs in a private mount namespace, and a
/// bpffs seen (or mounted) there vanishes with the daemon: its pins, and so
/// the datapath, would not survive a restart or a SIGKILL, and no successor
/// could adopt it. The host is PID 1's mount namespace, or, where PID 1 may
/// not be inspected (some sandboxes), the parent process's.
pub fn check_bpffs_visible_from_host(dir: &Path) -> Result<()> {
    let Ok(ours) = fs::read_link("/proc/self/ns/mnt") else {
        return Ok(()); // No /proc: cannot tell.
    };
    // SAFETY: getppid cannot fail.
    let parent = unsafe { libc::getppid() };
    let Some((host, theirs)) = ["1".to_owned(), parent.to_string()]
        .into_iter()
        .find_map(|pid| Some((fs::read_link(format!("/proc/{pid}/ns/mnt")).ok()?, pid)))
    else {
        return Ok(());
    };
    if ours == host {
        return Ok(());
    }
    let probe = dir
        .ancestors()
        .find(|p| p.exists())
        .unwrap_or(Path::new("/"));
    let here = fs::metadata(probe).with_context(|| format!("inspecting {}", probe.display()))?;
    let relative = probe.strip_prefix("/").unwrap_or(probe);
    let there = fs::metadata(Path::new("/proc").join(theirs).join("root").join(relative));
    if there.is_ok_and(|m| m.dev() == here.dev()) {
        return Ok(());
    }
    bail!(
        "the bpf filesystem at {} is private to this mount namespace (as under `ip netns exec`): \
         the datapath's pins would vanish with this daemon and no restart could adopt them. \
         Run `nsenter --net=/run/netns/{} xdplb run ...` instead (it keeps the host's mounts), \
         or mount bpffs on the host first and make it visible here, \
         or pass --allow-private-bpffs if losing the pins is intended",
        probe.display(),
        own_netns_name().unwrap_or_else(|| "NS".into())
    );
}

/// The name under /run/netns of this process's network namespace, if any.
fn own_netns_name() -> Option<String> {
    let ours = fs::metadata("/proc/self/ns/net").ok()?;
    fs::read_dir("/run/netns")
        .ok()?
        .flatten()
        .find_map(|entry| {
            let meta = fs::metadata(entry.path()).ok()?;
            (meta.dev() == ours.dev() && meta.ino() == ours.ino())
                .then(|| entry.file_name().to_string_lossy().into_owned())
        })
}

/// Refuses pinned maps whose format differs from this build's, naming the
/// map and what to do, instead of letting the program read garbage.
fn check_pinned_maps(pin_dir: &Path) -> Result<()> {
    for (name, kind, key, value, max) in expected_maps() {
        let path = pin_dir.join(name);
        if !path.exists() {
            continue;
        }
        let info = MapInfo::from_pin(&path)
            .with_context(|| format!("opening pinned map {}", path.display()))?;
        let found = (
            info.map_type().ok(),
            info.key_size() as usize,
            info.value_size() as usize,
            info.max_entries(),
        );
        if found != (Some(kind), key, value, max) {
            let (found_kind, found_key, found_value, found_max) = found;
            bail!(
                "pinned map {} was made by an incompatible xdplb build (type/key/value/entries \
                 {found_kind:?}/{found_key}/{found_value}/{found_max}, expected \
                 {kind:?}/{key}/{value}/{max}); run `xdplb detach --all` to remove the old \
                 datapath (this drops its flow table) and start again",
                path.display()
            );
        }
    }
    Ok(())
}

/// Reads the datapath's log records (aya-log) into the daemon's log.
pub type DatapathLogger = aya_log::EbpfLogger<&'static dyn log::Log>;

/// The loaded program and its maps.
pub struct Datapath {
    pub ebpf: Ebpf,
    pub pin_dir: PathBuf,
    /// Taken by the daemon, which polls it; it must live as long as the
    /// program may log (dropping it closes the log ring buffer).
    pub logger: Option<DatapathLogger>,
}

impl Datapath {
    /// Loads the embedded program. Its maps are pinned in `pin_dir`; maps
    /// already pinned there (by an earlier run) are adopted, contents and
    /// all, after a format check.
    pub fn load(pin_dir: &Path) -> Result<Self> {
        ensure_bpffs(pin_dir)?;
        fs::create_dir_all(pin_dir)
            .with_context(|| format!("creating pin directory {}", pin_dir.display()))?;
        check_pinned_maps(pin_dir)?;
        let mut ebpf = EbpfLoader::new()
            .default_map_pin_directory(pin_dir)
            .load(OBJECT)
            .context("loading the XDP program")?;
        // Before the program is verified: the logger sets the log level
        // the program reads.
        let logger = aya_log::EbpfLogger::init(&mut ebpf)
            .inspect_err(|err| warn!("the datapath's log records are not available: {err}"))
            .ok();
        let program: &mut Xdp = ebpf
            .program_mut(PROGRAM_NAME)
            .context("XDP program missing from the object")?
            .try_into()?;
        program.load().context("verifying the XDP program")?;
        Ok(Self {
            ebpf,
            pin_dir: pin_dir.to_owned(),
            logger,
        })
    }

    /// The XDP program.
    pub fn program(&mut self) -> &mut Xdp {
        self.ebpf
            .program_mut(PROGRAM_NAME)
            .expect("checked at load")
            .try_into()
            .expect("checked at load")
    }

    /// Attaches to `iface` through a bpf_link pinned at
    /// `<pin_dir>/links/<iface>`, so the program stays attached when the
    /// daemon exits or dies. If an earlier daemon left such a link, this
    /// program replaces the old one in it atomically (no packet is ever
    /// without a program) and `Attached::Adopted` is returned.
    pub fn attach_pinned(&mut self, iface: &str, mode: AttachMode) -> Result<Attached> {
        interface_index(iface)?;
        let links = self.pin_dir.join("links");
        fs::create_dir_all(&links).with_context(|| format!("creating {}", links.display()))?;
        let path = links.join(iface);
        let (attached, id) = if path.exists() {
            let old = PinnedLink::from_pin(&path)
                .with_context(|| format!("opening pinned link {}", path.display()))?
                .unpin()
                .with_context(|| format!("unpinning {}", path.display()))?;
            let old = XdpLink::try_from(old)
                .with_context(|| format!("{} is not an XDP link", path.display()))?;
            let id = self
                .program()
                .attach_to_link(old)
                .with_context(|| format!("replacing the program on {iface}"))?;
            (Attached::Adopted, id)
        } else {
            self.attach(iface, mode)?
        };
        let link: FdLink = self.program().take_link(id)?.try_into().context(
            "the kernel attached XDP without a bpf_link; hot restart needs Linux >= 5.9",
        )?;
        // Pinned and then closed here: the pin is the link's only reference,
        // so `detach` (unpin) really detaches.
        link.pin(&path)
            .with_context(|| format!("pinning the XDP link at {}", path.display()))?;
        Ok(attached)
    }

    /// Why this datapath is no longer attached to `iface` as it should be
    /// (its link pin removed, or another program in its place), if it is
    /// not; `None` when all is well.
    pub fn attachment_problem(&mut self, iface: &str) -> Result<Option<String>> {
        let pin = self.pin_dir.join("links").join(iface);
        if !pin.exists() {
            return Ok(Some(format!("its link pin {} was removed", pin.display())));
        }
        let info = self.program().info();
        let ours = info.context("reading the XDP program's info")?.id();
        let ids = attached_program_ids(iface)?;
        if !ids.contains(&ours) {
            return Ok(Some(format!(
                "the program attached to {iface} is {ids:?}, not ours ({ours})"
            )));
        }
        Ok(None)
    }

    /// Attaches again to `iface` after [`Self::attachment_problem`]
    /// found it detached; a pin left on a dead link is replaced.
    pub fn reattach(&mut self, iface: &str, mode: AttachMode) -> Result<Attached> {
        let pin = self.pin_dir.join("links").join(iface);
        if pin.exists() {
            fs::remove_file(&pin).with_context(|| format!("removing {}", pin.display()))?;
        }
        self.attach_pinned(iface, mode)
    }

    /// Attaches to `iface`, falling back from native to generic mode in
    /// `Auto` mode. The attachment lives as long as `self` owns the link.
    fn attach(&mut self, iface: &str, mode: AttachMode) -> Result<(Attached, XdpLinkId)> {
        match mode {
            AttachMode::Native => {
                attach_one(self.program(), iface, XdpMode::Driver).map(|id| (Attached::Native, id))
            }
            AttachMode::Generic => {
                attach_one(self.program(), iface, XdpMode::Skb).map(|id| (Attached::Generic, id))
            }
            AttachMode::Auto => match attach_one(self.program(), iface, XdpMode::Driver) {
                Ok(id) => Ok((Attached::Native, id)),
                // Generic mode would meet the same program.
                Err(native) if native.is::<Occupied>() => Err(native),
                Err(native) => {
                    warn!("native XDP on {iface} failed ({native:#}); trying generic mode");
                    // Both errors: the native one usually says why.
                    attach_one(self.program(), iface, XdpMode::Skb)
                        .map(|id| (Attached::Generic, id))
                        .map_err(|generic| {
                            anyhow::anyhow!(
                                "attaching XDP to {iface}: native mode failed ({native:#}), \
                                 then generic mode failed ({generic:#})"
                            )
                        })
                }
            },
        }
    }
}

/// The index of interface `iface` in this network namespace, or an error
/// naming it.
pub fn interface_index(iface: &str) -> Result<u32> {
    // SAFETY: a NUL-terminated name, alive for the call.
    let index = CString::new(iface).map_or(0, |c| unsafe { libc::if_nametoindex(c.as_ptr()) });
    if index == 0 {
        bail!("unknown interface {iface:?}");
    }
    Ok(index)
}

/// The kernel refused an attachment because another XDP program holds the
/// interface (EBUSY, or EEXIST from the other mode).
#[derive(Debug, thiserror::Error)]
#[error(
    "another XDP program is attached to {iface} (`ip link show {iface}` shows it): detach it, or \
     stop the xdplb daemon that drives it"
)]
struct Occupied {
    iface: String,
    source: aya::programs::ProgramError,
}

fn attach_one(program: &mut Xdp, iface: &str, mode: XdpMode) -> Result<XdpLinkId> {
    interface_index(iface)?;
    let attached = program.attach(iface, mode).map_err(|source| {
        let errno = std::iter::successors(Some(&source as &dyn std::error::Error), |e| e.source())
            .find_map(|e| e.downcast_ref::<std::io::Error>()?.raw_os_error());
        match errno {
            Some(libc::EBUSY | libc::EEXIST) => anyhow::Error::new(Occupied {
                iface: iface.to_owned(),
                source,
            }),
            _ => source.into(),
        }
    });
    attached.with_context(|| format!("attaching XDP to {iface} in {} mode", mode_name(mode)))
}

/// The CLI's name for an XDP mode ("native", "generic").
fn mode_name(mode: XdpMode) -> &'static str {
    match mode {
        XdpMode::Driver => "native",
        XdpMode::Skb => "generic",
        XdpMode::Hardware => "offload",
        XdpMode::Default => "default",
    }
}

/// Loads one of the map-less programs of `PASSTHROUGH_OBJECT` (by name).
pub fn load_passthrough(name: &str) -> Result<(Ebpf, String)> {
    let mut ebpf = Ebpf::load(PASSTHROUGH_OBJECT).context("loading the pass-through object")?;
    let program: &mut Xdp = ebpf
        .program_mut(name)
        .with_context(|| format!("no program {name}"))?
        .try_into()?;
    program
        .load()
        .with_context(|| format!("verifying {name}"))?;
    Ok((ebpf, name.to_owned()))
}

/// Attaches the pass-through program to `iface` in native mode, for as long
/// as the returned object lives.
pub fn attach_passthrough(iface: &str) -> Result<Ebpf> {
    let (mut ebpf, name) = load_passthrough(PASS_PROGRAM)?;
    let program: &mut Xdp = ebpf.program_mut(&name).expect("loaded").try_into()?;
    attach_one(program, iface, XdpMode::Driver)?;
    Ok(ebpf)
}

/// Detaches the program from `iface` by removing the link pinned for it
/// in `pin_dir`. Returns whether there was one.
pub fn detach(pin_dir: &Path, iface: &str) -> Result<bool> {
    let path = pin_dir.join("links").join(iface);
    if !path.exists() {
        return Ok(false);
    }
    let link = PinnedLink::from_pin(&path)
        .with_context(|| format!("opening pinned link {}", path.display()))?;
    // Unpinning drops the last reference: the kernel detaches the program.
    drop(
        link.unpin()
            .with_context(|| format!("removing {}", path.display()))?,
    );
    Ok(true)
}

/// Interfaces that have a link pinned in `pin_dir`.
pub fn pinned_interfaces(pin_dir: &Path) -> Result<Vec<String>> {
    let links = pin_dir.join("links");
    if !links.exists() {
        return Ok(Vec::new());
    }
    let mut names = fs::read_dir(&links)
        .with_context(|| format!("listing {}", links.display()))?
        .map(|entry| Ok(entry?.file_name().to_string_lossy().into_owned()))
        .collect::<Result<Vec<_>>>()?;
    names.sort();
    Ok(names)
}

/// Removes `pin_dir` and every pin in it.
pub fn remove_pins(pin_dir: &Path) -> Result<()> {
    match fs::remove_dir_all(pin_dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e).with_context(|| format!("removing {}", pin_dir.display())),
    }
}

/// The ids of the XDP programs attached to `iface` (in any mode), from the
/// link's `IFLA_XDP` attributes.
pub fn attached_program_ids(iface: &str) -> Result<Vec<u32>> {
    let mut msg = LinkMessage::default();
    msg.attributes.push(LinkAttribute::IfName(iface.to_owned()));
    let answer = Rtnl::open()?
        .get(RouteNetlinkMessage::GetLink(msg))
        .with_context(|| format!("looking up interface {iface}"))?;
    let RouteNetlinkMessage::NewLink(link) = answer else {
        bail!("looking up interface {iface}: the kernel answered {answer:?}");
    };
    // The kernel reports the program of each mode in use (SKB, DRV, HW) and,
    // when only one mode is, that program once more as IFLA_XDP_PROG_ID.
    let mut ids: Vec<u32> = link
        .attributes
        .iter()
        .filter_map(|a| match a {
            LinkAttribute::Xdp(xdp) => Some(xdp),
            _ => None,
        })
        .flatten()
        .filter_map(|x| match x {
            LinkXdp::ProgId(id)
            | LinkXdp::SkbProgId(id)
            | LinkXdp::DrvProgId(id)
            | LinkXdp::HwProgId(id) => Some(*id),
            _ => None,
        })
        .collect();
    ids.sort_unstable();
    ids.dedup();
    Ok(ids)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The kernel's id of the pass program loaded in `ebpf`.
    fn pass_id(ebpf: &mut Ebpf) -> u32 {
        let program: &mut Xdp = ebpf.program_mut(PASS_PROGRAM).unwrap().try_into().unwrap();
        program.info().unwrap().id()
    }

    #[test]
    fn attached_program_ids_from_the_kernel() {
        crate::rtnl::in_new_netns(|| {
            assert_eq!(attached_program_ids("lo").unwrap(), Vec::<u32>::new());
            let err = attached_program_ids("xdplb-nosuch0").unwrap_err();
            assert!(format!("{err:#}").contains("xdplb-nosuch0"), "{err:#}");

            // Native mode on a veth; generic mode on lo (no native XDP there).
            let veth = ["link", "add", "xdplb-a", "type", "veth", "peer", "xdplb-b"];
            let status = std::process::Command::new("ip")
                .args(veth)
                .status()
                .unwrap();
            assert!(status.success(), "ip {veth:?}: {status}");
            let mut native = attach_passthrough("xdplb-a").unwrap();
            assert_eq!(
                attached_program_ids("xdplb-a").unwrap(),
                [pass_id(&mut native)]
            );
            let (mut generic, name) = load_passthrough(PASS_PROGRAM).unwrap();
            let program: &mut Xdp = generic.program_mut(&name).unwrap().try_into().unwrap();
            attach_one(program, "lo", XdpMode::Skb).unwrap();
            assert_eq!(attached_program_ids("lo").unwrap(), [pass_id(&mut generic)]);
        });
    }
}
