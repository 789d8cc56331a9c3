//! The backends serve QEMU's own vhost-user frontends, not only our bridge:
//! the card OS boots as a plain virtual machine with `vhost-user-blk-pci`
//! (mic-blk) and `-netdev vhost-user` + `virtio-net-pci` (mic-net), and uses
//! both. The test drives the VM's serial console.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use mic_test_support::{
    bin, card_boot_args, image, qemu, serial_shell_online, sha256_range, sum_in, wait_for, TempDir,
    BOOT_TIMEOUT,
};

const MIB: u64 = 1 << 20;
const CMD: Duration = Duration::from_secs(120);

struct Kill(Child);

impl Drop for Kill {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn daemon(cmd: &mut Command, dir: &TempDir, log: &str) -> Kill {
    let f = std::fs::File::create(dir.join(log)).unwrap();
    Kill(
        cmd.stdin(Stdio::null())
            .stdout(f.try_clone().unwrap())
            .stderr(f)
            .spawn()
            .unwrap(),
    )
}

/// Reads one `-netdev stream` frame (4-byte big-endian length, then the frame).
fn read_frame(s: &mut UnixStream) -> Vec<u8> {
    let mut len = [0u8; 4];
    s.read_exact(&mut len).unwrap();
    let mut f = vec![0u8; u32::from_be_bytes(len) as usize];
    s.read_exact(&mut f).unwrap();
    f
}

#[test]
fn stock_qemu_frontends_are_served_by_our_backends() {
    let dir = TempDir::new("stock");
    let p = |n: &str| dir.join(n);
    let img = image(dir.path(), "disk.img", 64 * MIB);
    let _blk = daemon(
        Command::new(bin("mic-blk"))
            .arg("--socket-path")
            .arg(p("blk.sock"))
            .arg("--image")
            .arg(&img),
        &dir,
        "mic-blk.log",
    );
    // mic-net listens for its stream peer: this test.
    let _net = daemon(
        Command::new(bin("mic-net"))
            .arg("--socket-path")
            .arg(p("net.sock"))
            .arg("--stream")
            .arg(format!("unix:{}", p("peer.sock").display()))
            .arg("--listen"),
        &dir,
        "mic-net.log",
    );
    wait_for(Duration::from_secs(20), "the backends' sockets", || {
        (p("blk.sock").exists() && p("net.sock").exists() && p("peer.sock").exists()).then_some(())
    });
    let mut peer = UnixStream::connect(p("peer.sock")).unwrap();
    peer.set_read_timeout(Some(BOOT_TIMEOUT)).unwrap();

    let _vm = daemon(
        Command::new(qemu())
            .args(["-accel", "tcg", "-cpu", "max", "-smp", "1", "-m", "512"])
            .args(["-nodefaults", "-no-user-config"])
            .args(["-object", "memory-backend-memfd,id=mem,size=512M,share=on"])
            .args([
                "-machine",
                "q35,memory-backend=mem",
                "-display",
                "none",
                "-monitor",
                "none",
            ])
            .arg("-chardev")
            .arg(format!("socket,id=vb,path={}", p("blk.sock").display()))
            .args(["-device", "vhost-user-blk-pci,chardev=vb,num-queues=1"])
            .arg("-chardev")
            .arg(format!("socket,id=vn,path={}", p("net.sock").display()))
            .args(["-netdev", "vhost-user,id=n0,chardev=vn"])
            .args(["-device", "virtio-net-pci,netdev=n0,mac=52:54:00:12:34:99"])
            .arg("-chardev")
            .arg(format!(
                "socket,id=ser,path={},server=on,wait=off",
                p("serial.sock").display()
            ))
            .args(["-serial", "chardev:ser"])
            .args(card_boot_args("mic.expect=blk,net")),
        &dir,
        "qemu.log",
    );
    let mut shell = serial_shell_online(&p("serial.sock"));
    assert!(
        shell.output().contains("mic-card: online devices=net,blk"),
        "{}",
        shell.output()
    );

    // Disk: what the VM writes is in the image, and it reads it back.
    let out = shell.run(
        "dd if=/dev/urandom of=/tmp/w bs=1M count=8 2>/dev/null && sha256sum /tmp/w && \
         dd if=/tmp/w of=/dev/vda bs=1M seek=4 oflag=direct 2>/dev/null",
        CMD,
    );
    assert_eq!(sha256_range(&img, 4 * MIB, 8 * MIB), sum_in(&out));
    let out = shell.run(
        "dd if=/dev/vda bs=1M skip=4 count=8 iflag=direct 2>/dev/null | sha256sum",
        CMD,
    );
    assert_eq!(sum_in(&out), sha256_range(&img, 4 * MIB, 8 * MIB));

    // Network: the VM's ARP request for the host reaches the stream peer; our
    // reply reaches the VM, which then sends its ICMP echo request.
    shell.type_text("ping -c 3 -W 2 172.31.1.254 >/dev/null 2>&1 &\n");
    let host_mac = [0x02, 0, 0, 0, 0, 0xfe];
    let vm_mac = [0x52, 0x54, 0, 0x12, 0x34, 0x99];
    let arp = loop {
        let f = read_frame(&mut peer);
        // ARP request (ethertype 0x0806, op 1) for 172.31.1.254 from the VM.
        if f.len() >= 42
            && f[12..14] == [0x08, 0x06]
            && f[20..22] == [0, 1]
            && f[38..42] == [172, 31, 1, 254]
        {
            break f;
        }
    };
    assert_eq!(arp[6..12], vm_mac, "ARP from another MAC");
    let mut reply = Vec::with_capacity(42);
    reply.extend_from_slice(&vm_mac);
    reply.extend_from_slice(&host_mac);
    reply.extend_from_slice(&[0x08, 0x06, 0, 1, 0x08, 0, 6, 4, 0, 2]);
    reply.extend_from_slice(&host_mac);
    reply.extend_from_slice(&[172, 31, 1, 254]);
    reply.extend_from_slice(&vm_mac);
    reply.extend_from_slice(&arp[28..32]);
    let mut framed = (reply.len() as u32).to_be_bytes().to_vec();
    framed.extend_from_slice(&reply);
    peer.write_all(&framed).unwrap();
    loop {
        let f = read_frame(&mut peer);
        // IPv4 ICMP echo request to 172.31.1.254, sent to the MAC we gave.
        if f.len() >= 35
            && f[12..14] == [0x08, 0x00]
            && f[23] == 1
            && f[30..34] == [172, 31, 1, 254]
            && f[34] == 8
        {
            assert_eq!(
                f[0..6],
                host_mac,
                "echo request not sent to the resolved MAC"
            );
            break;
        }
    }
}
