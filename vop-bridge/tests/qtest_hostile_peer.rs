//! The `mic-x100` device against a host side that misbehaves
//! (`docs/device-protocol.md`, "Flow control" and "Registration limits"):
//! a peer that never reads must not stall the card or the monitor, and a peer
//! that registers without end must be refused before KVM runs out.
//!
//! QEMU comes from `$MIC_QEMU` or `build/qemu/bin/qemu-system-x86_64`.

use std::io::Read;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use mic_test_support::*;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
use vop_bridge::abi::reg;
use vop_bridge::device_protocol::{DeviceLink, DeviceMessage, HostMessage, ProtocolError};

const T: Duration = Duration::from_secs(5);

/// Connects to the device socket and waits until the device has seen the
/// connection (its HELLO is readable), reading nothing.
fn silent_peer(q: &Qemu) -> UnixStream {
    let deadline = Instant::now() + T;
    let s = loop {
        match UnixStream::connect(q.device_socket()) {
            Ok(s) => break s,
            Err(e) if Instant::now() < deadline => {
                let _ = e;
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => panic!("connect to the device: {e}"),
        }
    };
    let mut pfd = libc::pollfd {
        fd: s.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd.
    let n = unsafe { libc::poll(&mut pfd, 1, 5000) };
    assert_eq!(n, 1, "the device sent nothing on connection");
    s
}

/// Reads until EOF (true) or until `timeout` passes with the peer open.
fn drains_to_eof(s: &mut UnixStream, timeout: Duration) -> bool {
    s.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let deadline = Instant::now() + timeout;
    let mut buf = vec![0u8; 1 << 16];
    while Instant::now() < deadline {
        match s.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => {}
            Err(e)
                if e.kind() == std::io::ErrorKind::WouldBlock
                    || e.kind() == std::io::ErrorKind::TimedOut => {}
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return true,
            Err(e) => panic!("reading the device socket: {e}"),
        }
    }
    false
}

#[test]
fn a_peer_that_never_reads_cannot_stall_the_card_or_the_monitor() {
    let mut q = Qemu::start_with(&QemuArgs {
        qmp: true,
        ..QemuArgs::default()
    });
    let card = PciCard::setup(&mut q);
    let mut peer = silent_peer(&q);

    // Every value distinct, so nothing coalesces: far more than the socket
    // buffer and the device's queue hold. Each write is a vCPU MMIO exit;
    // with a blocking device the qtest command never returns.
    let start = Instant::now();
    for i in 0..8000u32 {
        q.writel(card.reg(reg::doorbell(i % 32)), 0x1000_0000 | i);
    }
    let took = start.elapsed();
    assert!(took < Duration::from_secs(20), "8000 writes took {took:?}");

    // The monitor answers and the machine still runs.
    let mut qmp = q.qmp();
    let status = qmp.execute("query-status");
    assert!(status.contains("\"running\": true"), "{status}");
    // The card's registers still work.
    q.writel(card.reg(reg::spad(3)), 0x5a5a);
    assert_eq!(q.readl(card.reg(reg::spad(3))), 0x5a5a);

    // The overflow policy: the device let the peer go...
    assert!(
        drains_to_eof(&mut peer, T),
        "the device kept a peer that does not read"
    );
    // ...and a well-behaved host side attaches again and is served.
    let mut link = DeviceLink::connect_retry(&q.device_socket(), T).unwrap();
    link.set_read_timeout(Some(T)).unwrap();
    link.attach().unwrap();
    link.sync().unwrap();
    q.writel(card.reg(reg::doorbell(4)), 77);
    loop {
        match link.recv().unwrap() {
            DeviceMessage::MemTable(_) => {}
            DeviceMessage::Doorbell { doorbell, value } => {
                assert_eq!((doorbell, value), (4, 77));
                break;
            }
            m => panic!("expected DOORBELL, got {m:?}"),
        }
    }
}

#[test]
fn repeated_doorbells_to_a_slow_peer_are_coalesced_not_fatal() {
    let mut q = Qemu::start();
    let card = PciCard::setup(&mut q);
    let stream = silent_peer(&q);
    // The same unmatched value again and again while the peer reads nothing.
    for _ in 0..8000 {
        q.writel(card.reg(reg::doorbell(9)), 0xabc);
    }
    // The peer was kept: it attaches on the same connection and is answered.
    let mut link = DeviceLink::from_stream(stream);
    link.set_read_timeout(Some(T)).unwrap();
    link.attach().unwrap();
    link.sync().unwrap();
    let mut doorbells = 0;
    while link.has_pending() {
        match link.recv().unwrap() {
            DeviceMessage::Doorbell { doorbell, value } => {
                assert_eq!((doorbell, value), (9, 0xabc));
                doorbells += 1;
            }
            DeviceMessage::MemTable(_) => {}
            m => panic!("unexpected {m:?}"),
        }
    }
    assert!(doorbells >= 1, "the doorbell was lost");
    assert!(
        doorbells < 8000,
        "{doorbells} identical doorbells were queued"
    );
}

fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count()
}

#[test]
fn memory_tables_to_a_slow_peer_do_not_pile_up_fds() {
    let mut q = Qemu::start();
    let card = PciCard::setup(&mut q);
    let stream = silent_peer(&q);
    let before = open_fds(q.pid());
    // Each toggle of memory decoding maps or unmaps BAR2 (the aperture),
    // and each new flat view is a MEM_TABLE carrying its regions' fds.
    let cmd = cfg_read16(&mut q, card.dev, 0x04);
    for _ in 0..300 {
        cfg_write16(&mut q, card.dev, 0x04, cmd & !0x2);
        cfg_write16(&mut q, card.dev, 0x04, cmd);
    }
    let during = open_fds(q.pid());
    assert!(
        during <= before + 16,
        "{before} fds before, {during} with the tables queued"
    );
    // The peer still gets the current table once it reads.
    let mut link = DeviceLink::from_stream(stream);
    link.set_read_timeout(Some(T)).unwrap();
    let att = link.attach().unwrap();
    link.sync().unwrap();
    let mut table = att.ram.table().to_vec();
    while link.has_pending() {
        if let DeviceMessage::MemTable(t) = link.recv().unwrap() {
            table = t.iter().map(|(r, _)| *r).collect();
        }
    }
    assert!(
        table.iter().any(|r| r.gpa == BAR2_ADDR),
        "aperture missing from the last table {table:?}"
    );
}

fn refused_errno(r: Result<(), ProtocolError>) -> Option<u32> {
    match r {
        Ok(()) => None,
        Err(ProtocolError::Refused { errno, .. }) => Some(errno),
        Err(e) => panic!("link failed: {e}"),
    }
}

#[test]
fn registrations_are_capped_and_refused_beyond() {
    let mut q = Qemu::start();
    let _card = PciCard::setup(&mut q);
    let mut link = DeviceLink::connect_retry(&q.device_socket(), T).unwrap();
    link.set_read_timeout(Some(T)).unwrap();
    link.attach().unwrap();
    link.sync().unwrap();

    let fds: Vec<EventFd> = (0..300)
        .map(|_| EventFd::new(EFD_NONBLOCK).unwrap())
        .collect();
    let mut accepted = 0;
    let mut first_refusal = None;
    for (i, e) in fds.iter().enumerate() {
        let r = link.request(&HostMessage::SetDoorbellFd {
            doorbell: (i % 32) as u32,
            value: i as u32,
            fd: Some(e.as_raw_fd()),
        });
        match refused_errno(r) {
            None => accepted += 1,
            Some(errno) => {
                first_refusal.get_or_insert((i, errno));
            }
        }
    }
    assert_eq!(accepted, 256);
    assert_eq!(first_refusal, Some((256, libc::ENOSPC as u32)));
    // Replacing a registered pair is still allowed at the cap.
    let r = link.request(&HostMessage::SetDoorbellFd {
        doorbell: 0,
        value: 0,
        fd: Some(fds[299].as_raw_fd()),
    });
    assert_eq!(refused_errno(r), None);
    // Removing one makes room for one.
    link.request(&HostMessage::SetDoorbellFd {
        doorbell: 1,
        value: 1,
        fd: None,
    })
    .unwrap();
    let r = link.request(&HostMessage::SetDoorbellFd {
        doorbell: 5,
        value: 1000,
        fd: Some(fds[298].as_raw_fd()),
    });
    assert_eq!(refused_errno(r), None);

    let mut accepted = 0;
    let mut refused = Vec::new();
    for (i, e) in fds.iter().enumerate() {
        let r = link.request(&HostMessage::SetVectorFd {
            vector: (i % 32) as u32,
            fd: Some(e.as_raw_fd()),
        });
        match refused_errno(r) {
            None => accepted += 1,
            Some(errno) => refused.push(errno),
        }
    }
    assert_eq!(accepted, 256);
    assert_eq!(refused, vec![libc::ENOSPC as u32; 300 - 256]);
    // Clearing a vector frees its registrations.
    link.request(&HostMessage::SetVectorFd {
        vector: 0,
        fd: None,
    })
    .unwrap();
    let r = link.request(&HostMessage::SetVectorFd {
        vector: 0,
        fd: Some(fds[0].as_raw_fd()),
    });
    assert_eq!(refused_errno(r), None);
    // The connection survived every refusal.
    link.sync().unwrap();
}
