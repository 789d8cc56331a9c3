//! Driving the real QEMU with the `mic-x100` device through QEMU's qtest
//! protocol (no guest code runs: the test plays the card
//! OS through PCI config space and memory accesses) and the real host side
//! (`vop_bridge::device_protocol`) over the device socket.

use std::fs::File;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use crate::paths::qemu;
use crate::process::Process;
use crate::temp::TempDir;

/// Guest RAM of the test machines.
pub const RAM_SIZE: u64 = 64 << 20;
/// Aperture size the tests configure.
pub const APERTURE_SIZE: u64 = 1 << 20;
/// Where the tests place BAR0 (registers).
pub const BAR0_ADDR: u64 = 0xfe00_0000;
/// Where the tests place BAR4 (MSI-X table and PBA).
pub const BAR4_ADDR: u64 = 0xfe10_0000;
/// Where the tests place BAR2 (the aperture), inside q35's 32-bit PCI hole.
pub const BAR2_ADDR: u64 = 0xc000_0000;
/// Guest RAM where MSI-X messages of vector v land (4 bytes per vector).
pub const MSI_SINK: u64 = 0x0030_0000;

/// The QEMU command line pieces the tests use.
pub struct QemuArgs {
    /// A QMP socket (`qmp.sock`, see [`Qemu::qmp`]).
    pub qmp: bool,
    /// Guest RAM from a shareable memfd backend (the device needs it).
    pub shared_ram: bool,
    /// That memfd backend with `share=off` (a start-up error case).
    pub ram_share_off: bool,
    /// The `-device` argument (the mic-x100 device and its properties).
    pub device: Option<String>,
    /// The device socket chardev `mic0` (`mic.sock`).
    pub chardev: bool,
    /// More arguments.
    pub extra: Vec<String>,
}

impl Default for QemuArgs {
    fn default() -> Self {
        QemuArgs {
            qmp: false,
            shared_ram: true,
            ram_share_off: false,
            device: Some(format!(
                "mic-x100,chardev=mic0,aperture-size={APERTURE_SIZE},node-id=3"
            )),
            chardev: true,
            extra: Vec::new(),
        }
    }
}

impl QemuArgs {
    fn build(&self, dir: &TempDir) -> Vec<String> {
        let mut a: Vec<String> = [
            "-machine",
            "q35",
            "-nodefaults",
            "-display",
            "none",
            "-serial",
            "none",
            "-monitor",
            "none",
            "-m",
            "64M",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        if self.shared_ram {
            a.push("-object".into());
            a.push(format!(
                "memory-backend-memfd,id=mem,size={RAM_SIZE},share={}",
                if self.ram_share_off { "off" } else { "on" }
            ));
            a.push("-machine".into());
            a.push("memory-backend=mem".into());
        }
        if self.chardev {
            a.push("-chardev".into());
            a.push(format!(
                "socket,id=mic0,path={},server=on,wait=off",
                dir.join("mic.sock").display()
            ));
        }
        if self.qmp {
            a.push("-qmp".into());
            a.push(format!(
                "unix:{},server=on,wait=off",
                dir.join("qmp.sock").display()
            ));
        }
        if let Some(d) = &self.device {
            a.push("-device".into());
            a.push(d.clone());
        }
        a.extend(self.extra.iter().cloned());
        a
    }
}

/// Runs QEMU with `args` (and no qtest) and waits for it to exit on its own;
/// returns its exit status and stderr. Used for start-up errors.
pub fn run_qemu_expecting_exit(args: &QemuArgs, timeout: Duration) -> (ExitStatus, String) {
    let dir = TempDir::new("exit");
    let mut cmd = Command::new(qemu());
    cmd.args(args.build(&dir))
        .args(["-accel", "qtest", "-S"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("spawn qemu");
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(st) = child.try_wait().unwrap() {
            let mut err = String::new();
            child
                .stderr
                .take()
                .unwrap()
                .read_to_string(&mut err)
                .unwrap();
            return (st, err);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("QEMU did not exit within {timeout:?} although its configuration is invalid");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A running QEMU driven through qtest.
pub struct Qemu {
    process: Process,
    qtest: BufReader<UnixStream>,
    qtest_w: UnixStream,
    stderr_path: PathBuf,
    /// Its directory: sockets and stderr.
    pub dir: TempDir,
}

impl Qemu {
    /// Starts QEMU with the default test configuration.
    pub fn start() -> Qemu {
        Qemu::start_with(&QemuArgs::default())
    }

    /// Starts QEMU with `args`, connected to the test through qtest.
    pub fn start_with(args: &QemuArgs) -> Qemu {
        let dir = TempDir::new("qtest");
        let qtest_path = dir.join("qtest.sock");
        let listener = UnixListener::bind(&qtest_path).unwrap();
        listener.set_nonblocking(true).unwrap();
        let stderr_path = dir.join("stderr");
        let mut cmd = Command::new(qemu());
        cmd.args(args.build(&dir))
            .args(["-accel", "qtest", "-qtest"])
            .arg(format!("unix:{}", qtest_path.display()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(File::create(&stderr_path).unwrap());
        let mut child = cmd.spawn().expect("spawn qemu");
        let deadline = Instant::now() + Duration::from_secs(30);
        let stream = loop {
            match listener.accept() {
                Ok((s, _)) => break s,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(e) => panic!("qtest accept: {e}"),
            }
            if let Some(st) = child.try_wait().unwrap() {
                panic!(
                    "QEMU exited ({st}) before connecting qtest: {}",
                    std::fs::read_to_string(&stderr_path).unwrap_or_default()
                );
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("QEMU did not connect its qtest socket");
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        stream.set_nonblocking(false).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        let qtest_w = stream.try_clone().unwrap();
        Qemu {
            process: Process::from_child(child),
            qtest: BufReader::new(stream),
            qtest_w,
            stderr_path,
            dir,
        }
    }

    /// QEMU's process id (for its `/proc` entries).
    pub fn pid(&self) -> u32 {
        self.process.pid()
    }

    /// Path of the device socket QEMU listens on.
    pub fn device_socket(&self) -> PathBuf {
        self.dir.join("mic.sock")
    }

    /// What QEMU wrote on stderr so far.
    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }

    /// Sends one qtest command and returns the words after "OK".
    pub fn cmd(&mut self, line: &str) -> Vec<String> {
        if let Err(e) = self.qtest_w.write_all(format!("{line}\n").as_bytes()) {
            panic!("qtest '{line}': {e}; QEMU stderr: {}", self.stderr());
        }
        loop {
            let mut resp = String::new();
            let n = self
                .qtest
                .read_line(&mut resp)
                .unwrap_or_else(|e| panic!("qtest '{line}': {e}; QEMU stderr: {}", self.stderr()));
            if n == 0 {
                panic!(
                    "qtest '{line}': QEMU closed qtest; stderr: {}",
                    self.stderr()
                );
            }
            let words: Vec<String> = resp.split_whitespace().map(String::from).collect();
            match words.first().map(String::as_str) {
                Some("OK") => return words[1..].to_vec(),
                Some("IRQ") => continue,
                _ => panic!("qtest '{line}' failed: {resp}"),
            }
        }
    }

    fn value(&mut self, line: &str) -> u64 {
        let w = self.cmd(line);
        let s = w
            .first()
            .unwrap_or_else(|| panic!("qtest '{line}': no value"));
        u64::from_str_radix(s.trim_start_matches("0x"), 16).unwrap()
    }

    /// qtest `outl`.
    pub fn outl(&mut self, port: u16, v: u32) {
        self.cmd(&format!("outl {port:#x} {v:#x}"));
    }
    /// qtest `outb`.
    pub fn outb(&mut self, port: u16, v: u8) {
        self.cmd(&format!("outb {port:#x} {v:#x}"));
    }
    /// qtest `inl`.
    pub fn inl(&mut self, port: u16) -> u32 {
        self.value(&format!("inl {port:#x}")) as u32
    }
    /// qtest `readl`.
    pub fn readl(&mut self, addr: u64) -> u32 {
        self.value(&format!("readl {addr:#x}")) as u32
    }
    /// qtest `readw`.
    pub fn readw(&mut self, addr: u64) -> u16 {
        self.value(&format!("readw {addr:#x}")) as u16
    }
    /// qtest `readb`.
    pub fn readb(&mut self, addr: u64) -> u8 {
        self.value(&format!("readb {addr:#x}")) as u8
    }
    /// qtest `readq`.
    pub fn readq(&mut self, addr: u64) -> u64 {
        self.value(&format!("readq {addr:#x}"))
    }
    /// qtest `writel`.
    pub fn writel(&mut self, addr: u64, v: u32) {
        self.cmd(&format!("writel {addr:#x} {v:#x}"));
    }
    /// qtest `writew`.
    pub fn writew(&mut self, addr: u64, v: u16) {
        self.cmd(&format!("writew {addr:#x} {v:#x}"));
    }
    /// qtest `writeb`.
    pub fn writeb(&mut self, addr: u64, v: u8) {
        self.cmd(&format!("writeb {addr:#x} {v:#x}"));
    }
    /// qtest `writeq`.
    pub fn writeq(&mut self, addr: u64, v: u64) {
        self.cmd(&format!("writeq {addr:#x} {v:#x}"));
    }

    /// Reads guest memory (qtest `read`).
    pub fn read(&mut self, addr: u64, len: usize) -> Vec<u8> {
        let w = self.cmd(&format!("read {addr:#x} {len:#x}"));
        let hex = w[0].trim_start_matches("0x");
        (0..len)
            .map(|i| u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).unwrap())
            .collect()
    }

    /// Writes guest memory (qtest `write`).
    pub fn write(&mut self, addr: u64, data: &[u8]) {
        let hex: String = data.iter().map(|b| format!("{b:02x}")).collect();
        self.cmd(&format!("write {addr:#x} {:#x} 0x{hex}", data.len()));
    }

    /// Polls a 32-bit guest-memory word until `pred` holds or `timeout` passes;
    /// returns the last value read.
    pub fn poll_readl(&mut self, addr: u64, timeout: Duration, pred: impl Fn(u32) -> bool) -> u32 {
        let deadline = Instant::now() + timeout;
        loop {
            let v = self.readl(addr);
            if pred(v) || Instant::now() > deadline {
                return v;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Connects to QEMU's QMP socket (started with `QemuArgs::qmp`).
    pub fn qmp(&self) -> Qmp {
        Qmp::connect(&self.dir.join("qmp.sock"))
    }

    /// Waits for QEMU to exit on its own.
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        self.process.wait_exit(timeout).expect("QEMU did not exit")
    }

    /// Sends SIGTERM and waits for QEMU to exit.
    pub fn terminate(&mut self) -> ExitStatus {
        self.process
            .signal_and_wait(libc::SIGTERM, Duration::from_secs(30))
            .expect("QEMU did not exit after SIGTERM")
    }
}

impl Drop for Qemu {
    fn drop(&mut self) {
        // At once: a test may have left QEMU unable to handle SIGTERM.
        self.process.kill();
    }
}

// ---------------------------------------------------------------------------
// PCI through the legacy config mechanism (0xcf8/0xcfc) on bus 0.

/// The `0xcf8` address of config register `off` of device `dev` on bus 0.
pub fn cfg_addr(dev: u8, off: u8) -> u32 {
    0x8000_0000 | (u32::from(dev) << 11) | u32::from(off & 0xfc)
}

/// Reads a 32-bit config register.
pub fn cfg_read32(q: &mut Qemu, dev: u8, off: u8) -> u32 {
    q.outl(0xcf8, cfg_addr(dev, off));
    q.inl(0xcfc)
}

/// Writes a 32-bit config register.
pub fn cfg_write32(q: &mut Qemu, dev: u8, off: u8, v: u32) {
    q.outl(0xcf8, cfg_addr(dev, off));
    q.outl(0xcfc, v);
}

/// Reads a 16-bit config register.
pub fn cfg_read16(q: &mut Qemu, dev: u8, off: u8) -> u16 {
    (cfg_read32(q, dev, off) >> ((off & 2) * 8)) as u16
}

/// Writes a 16-bit config register.
pub fn cfg_write16(q: &mut Qemu, dev: u8, off: u8, v: u16) {
    let old = cfg_read32(q, dev, off);
    let shift = u32::from(off & 2) * 8;
    let new = (old & !(0xffff << shift)) | (u32::from(v) << shift);
    cfg_write32(q, dev, off, new);
}

/// Size of a memory BAR (probes with all ones, then restores).
pub fn bar_size(q: &mut Qemu, dev: u8, bar: u8) -> u64 {
    let off = 0x10 + 4 * bar;
    let lo = cfg_read32(q, dev, off);
    let is64 = lo & 0x6 == 0x4;
    cfg_write32(q, dev, off, 0xffff_ffff);
    let mut mask = u64::from(cfg_read32(q, dev, off) & !0xf);
    cfg_write32(q, dev, off, lo);
    if is64 {
        let hi = cfg_read32(q, dev, off + 4);
        cfg_write32(q, dev, off + 4, 0xffff_ffff);
        mask |= u64::from(cfg_read32(q, dev, off + 4)) << 32;
        cfg_write32(q, dev, off + 4, hi);
    } else {
        mask |= 0xffff_ffff_0000_0000;
    }
    (!mask).wrapping_add(1)
}

/// Finds a device by vendor and device id on bus 0.
pub fn find_device(q: &mut Qemu, vendor: u16, device: u16) -> Option<u8> {
    (0..32u8).find(|&d| cfg_read32(q, d, 0) == (u32::from(device) << 16 | u32::from(vendor)))
}

/// Finds a capability in config space.
pub fn find_cap(q: &mut Qemu, dev: u8, id: u8) -> Option<u8> {
    let mut p = (cfg_read32(q, dev, 0x34) & 0xfc) as u8;
    let mut guard = 0;
    while p != 0 && guard < 48 {
        let w = cfg_read32(q, dev, p);
        if w as u8 == id {
            return Some(p);
        }
        p = ((w >> 8) & 0xfc) as u8;
        guard += 1;
    }
    None
}

/// The MSI-X capability id.
pub const PCI_CAP_ID_MSIX: u8 = 0x11;

/// The card as the card OS sees it over qtest: BARs assigned, memory and
/// bus mastering enabled, MSI-X table located.
pub struct PciCard {
    /// Device number on bus 0.
    pub dev: u8,
    /// Offset of the MSI-X capability.
    pub msix_cap: u8,
    /// Guest address of the MSI-X table.
    pub table: u64,
    /// Guest address of the pending-bit array.
    pub pba: u64,
    /// Number of MSI-X vectors.
    pub vectors: u32,
}

impl PciCard {
    /// Finds the device, programs the BARs and enables memory decoding and
    /// bus mastering.
    pub fn setup(q: &mut Qemu) -> PciCard {
        let dev = find_device(q, 0x8086, 0x2250).expect("mic-x100 not found on bus 0");
        cfg_write32(q, dev, 0x10, BAR0_ADDR as u32);
        cfg_write32(q, dev, 0x18, BAR2_ADDR as u32);
        cfg_write32(q, dev, 0x1c, (BAR2_ADDR >> 32) as u32);
        cfg_write32(q, dev, 0x20, BAR4_ADDR as u32);
        let cmd = cfg_read16(q, dev, 0x04);
        cfg_write16(q, dev, 0x04, cmd | 0x2 | 0x4); // memory space, bus master
        let msix_cap = find_cap(q, dev, PCI_CAP_ID_MSIX).expect("no MSI-X capability");
        let ctrl = cfg_read16(q, dev, msix_cap + 2);
        let vectors = u32::from(ctrl & 0x7ff) + 1;
        let t = cfg_read32(q, dev, msix_cap + 4);
        let p = cfg_read32(q, dev, msix_cap + 8);
        assert_eq!(t & 7, 4, "MSI-X table not in BAR4");
        assert_eq!(p & 7, 4, "MSI-X PBA not in BAR4");
        PciCard {
            dev,
            msix_cap,
            table: BAR4_ADDR + u64::from(t & !7),
            pba: BAR4_ADDR + u64::from(p & !7),
            vectors,
        }
    }

    /// Guest address of register `off` in BAR0.
    pub fn reg(&self, off: u32) -> u64 {
        BAR0_ADDR + u64::from(off)
    }

    /// Points every MSI-X entry at `MSI_SINK + 4*v` with data `0xda7a0000 | v`,
    /// unmasked, clears the sink, and enables MSI-X.
    pub fn enable_msix(&self, q: &mut Qemu) {
        for v in 0..self.vectors {
            let e = self.table + 16 * u64::from(v);
            q.writel(e, (MSI_SINK + 4 * u64::from(v)) as u32);
            q.writel(e + 4, 0);
            q.writel(e + 8, msi_data(v));
            q.writel(e + 12, 0);
            q.writel(MSI_SINK + 4 * u64::from(v), 0);
        }
        let ctrl = cfg_read16(q, self.dev, self.msix_cap + 2);
        cfg_write16(q, self.dev, self.msix_cap + 2, (ctrl | 0x8000) & !0x4000);
    }

    /// Masks or unmasks vector `v`.
    pub fn mask_vector(&self, q: &mut Qemu, v: u32, masked: bool) {
        q.writel(self.table + 16 * u64::from(v) + 12, u32::from(masked));
    }

    /// Whether vector `v`'s pending bit is set.
    pub fn pending(&self, q: &mut Qemu, v: u32) -> bool {
        q.readl(self.pba + 4 * u64::from(v / 32)) & (1 << (v % 32)) != 0
    }

    /// Reads and clears every vector's sink word; returns the vectors that fired.
    pub fn take_fired(&self, q: &mut Qemu) -> Vec<u32> {
        let mut fired = Vec::new();
        for v in 0..self.vectors {
            let a = MSI_SINK + 4 * u64::from(v);
            let d = q.readl(a);
            if d != 0 {
                assert_eq!(d, msi_data(v), "vector {v} delivered foreign data");
                fired.push(v);
                q.writel(a, 0);
            }
        }
        fired
    }
}

/// The MSI data the tests program for vector `v`.
pub fn msi_data(v: u32) -> u32 {
    0xda7a_0000 | v
}

/// A minimal QMP client.
pub struct Qmp {
    w: UnixStream,
    r: BufReader<UnixStream>,
}

impl Qmp {
    /// Connects to a QMP socket (a QEMU of ours, or one micd started:
    /// `micN/qmp.sock`) and leaves capabilities negotiation.
    pub fn connect(socket: &Path) -> Qmp {
        let s = UnixStream::connect(socket).expect("QMP socket");
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let mut q = Qmp {
            w: s.try_clone().unwrap(),
            r: BufReader::new(s),
        };
        q.line(); // greeting
        q.execute("qmp_capabilities");
        q
    }

    fn line(&mut self) -> String {
        let mut l = String::new();
        self.r.read_line(&mut l).expect("QMP read");
        l
    }

    /// Runs a command without arguments; returns its reply line, or the
    /// empty string when QEMU closed the connection (as `quit` may).
    pub fn execute(&mut self, cmd: &str) -> String {
        self.w
            .write_all(format!("{{\"execute\": \"{cmd}\"}}\n").as_bytes())
            .unwrap();
        loop {
            let l = self.line();
            if l.is_empty() || l.contains("\"return\"") {
                return l;
            }
            assert!(!l.contains("\"error\""), "QMP {cmd}: {l}");
        }
    }
}
