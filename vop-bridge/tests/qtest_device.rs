//! The `mic-x100` QEMU device against `docs/vop-abi.md` and
//! `docs/device-protocol.md`: the real QEMU (driven through qtest, the test
//! playing the card OS) and the real host side of the device protocol
//! (`vop_bridge::device_protocol`) over the real socket.
//!
//! QEMU comes from `$MIC_QEMU` or `build/qemu/bin/qemu-system-x86_64`
//! (`scripts/build-qemu`); without it these tests fail.

use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::time::Duration;

use mic_test_support::*;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
use vop_bridge::abi::{self, reg};
use vop_bridge::device_protocol::{
    Attachment, CardEvent, DeviceLink, DeviceMessage, HostMessage, MemRegion, ProtocolError,
};

const T: Duration = Duration::from_secs(5);

fn connect(q: &Qemu) -> (DeviceLink, Attachment) {
    let mut link = DeviceLink::connect_retry(&q.device_socket(), T).expect("connect to device");
    link.set_read_timeout(Some(T)).unwrap();
    let att = link.attach().expect("attach");
    link.sync().expect("sync after attach");
    (link, att)
}

fn recv(link: &mut DeviceLink) -> DeviceMessage {
    link.recv().expect("message from the device")
}

/// Receives the next message that is not a MEM_TABLE update.
fn recv_skip_tables(link: &mut DeviceLink) -> DeviceMessage {
    loop {
        match recv(link) {
            DeviceMessage::MemTable(_) => continue,
            m => return m,
        }
    }
}

/// Nothing but MEM_TABLE updates arrived: checked with a SYNC round trip.
fn assert_quiet(link: &mut DeviceLink) {
    link.sync().unwrap();
    while link.has_pending() {
        match recv(link) {
            DeviceMessage::MemTable(_) => {}
            m => panic!("unexpected message {m:?}"),
        }
    }
}

fn eventfd() -> EventFd {
    EventFd::new(EFD_NONBLOCK).unwrap()
}

/// The eventfd's counter (read and reset), 0 when it was not signalled.
/// QEMU makes fds it receives blocking (O_NONBLOCK is shared across
/// SCM_RIGHTS), so poll before reading.
fn count(e: &EventFd) -> u64 {
    let mut pfd = libc::pollfd {
        fd: e.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd.
    if unsafe { libc::poll(&mut pfd, 1, 0) } <= 0 {
        return 0;
    }
    match e.read() {
        Ok(n) => n,
        Err(err) if err.kind() == std::io::ErrorKind::WouldBlock => 0,
        Err(err) => panic!("eventfd read: {err}"),
    }
}

#[test]
fn pci_identity_bars_and_msix() {
    let mut q = Qemu::start();
    let dev = find_device(&mut q, abi::PCI_VENDOR_ID, abi::PCI_DEVICE_ID)
        .expect("mic-x100 (8086:2250) not enumerated on bus 0");
    let class_rev = cfg_read32(&mut q, dev, 0x08);
    assert_eq!(class_rev >> 16, u32::from(abi::PCI_CLASS), "class code");
    assert_eq!(class_rev & 0xff, 0x20, "revision = stepping C0");
    // BAR0: 32-bit, non-prefetchable memory, 4 KiB.
    let bar0 = cfg_read32(&mut q, dev, 0x10);
    assert_eq!(bar0 & 0xf, 0x0);
    assert_eq!(bar_size(&mut q, dev, 0), abi::REGS_SIZE);
    // BAR2: 64-bit prefetchable memory, the aperture size.
    let bar2 = cfg_read32(&mut q, dev, 0x18);
    assert_eq!(bar2 & 0xf, 0xc, "BAR2 must be 64-bit prefetchable memory");
    assert_eq!(bar_size(&mut q, dev, 2), APERTURE_SIZE);
    // BAR4: MSI-X, 32 vectors.
    assert_ne!(bar_size(&mut q, dev, 4), 0);
    let card = PciCard::setup(&mut q);
    assert_eq!(card.vectors, abi::NUM_VECTORS);
    // BAR1, BAR3 (upper half of BAR2) and BAR5 are not separate BARs.
    assert_eq!(cfg_read32(&mut q, dev, 0x14), 0);
    assert_eq!(cfg_read32(&mut q, dev, 0x24), 0);
}

#[test]
fn identity_registers() {
    let mut q = Qemu::start();
    let card = PciCard::setup(&mut q);
    assert_eq!(q.readl(card.reg(reg::MAGIC)), reg::MAGIC_VALUE);
    assert_eq!(q.readl(card.reg(reg::ABI_VERSION)), reg::ABI_VERSION_VALUE);
    assert_eq!(q.readl(card.reg(reg::FAMILY)), reg::FAMILY_X100);
    assert_eq!(q.readl(card.reg(reg::STEPPING)), reg::STEPPING_C0);
    assert_eq!(q.readl(card.reg(reg::NODE_ID)), 3);
    assert_eq!(q.readl(card.reg(reg::NUM_SPADS)), abi::NUM_SPADS);
    assert_eq!(q.readl(card.reg(reg::NUM_DOORBELLS)), abi::NUM_DOORBELLS);
    assert_eq!(q.readl(card.reg(reg::NUM_VECTORS)), abi::NUM_VECTORS);
    assert_eq!(
        q.readl(card.reg(reg::APERTURE_SIZE_LO)),
        APERTURE_SIZE as u32
    );
    assert_eq!(q.readl(card.reg(reg::APERTURE_SIZE_HI)), 0);
    // Unlisted offsets read 0; non-32-bit accesses read 0 and are ignored.
    assert_eq!(q.readl(card.reg(0x30)), 0);
    assert_eq!(q.readl(card.reg(0xffc)), 0);
    assert_eq!(q.readw(card.reg(reg::MAGIC)), 0);
    assert_eq!(q.readb(card.reg(reg::MAGIC)), 0);
    assert_eq!(
        q.readl(card.reg(reg::doorbell(0))),
        0,
        "doorbells read as 0"
    );

    let (mut link, att) = connect(&q);
    assert_eq!(att.hello.node_id, 3);
    assert_eq!(att.hello.aperture_size, APERTURE_SIZE);
    assert_eq!(att.hello.num_spads, abi::NUM_SPADS);
    assert_eq!(att.hello.num_doorbells, abi::NUM_DOORBELLS);
    assert_eq!(att.hello.num_vectors, abi::NUM_VECTORS);
    assert!(att.hello.running);
    // Writes to read-only registers change nothing and are not forwarded.
    q.writel(card.reg(reg::MAGIC), 0x1234);
    q.writew(card.reg(reg::spad(2)), 0x55);
    assert_eq!(q.readl(card.reg(reg::MAGIC)), reg::MAGIC_VALUE);
    assert_eq!(q.readl(card.reg(reg::spad(2))), 0);
    assert_quiet(&mut link);
}

#[test]
fn scratchpads_and_state_registers_both_ways() {
    let mut q = Qemu::start();
    let card = PciCard::setup(&mut q);
    let (mut link, att) = connect(&q);
    assert_eq!(att.hello.spads, [0; 16]);
    assert_eq!(att.hello.device_page_offset(), None);

    // Host -> card.
    link.request(&HostMessage::RegWrite {
        offset: reg::spad(abi::SPAD_DP_LO),
        value: 0x1000,
    })
    .unwrap();
    link.request(&HostMessage::RegWrite {
        offset: reg::HOST_REQUEST,
        value: reg::HOST_REQUEST_SHUTDOWN,
    })
    .unwrap();
    assert_eq!(q.readl(card.reg(reg::spad(abi::SPAD_DP_LO))), 0x1000);
    assert_eq!(q.readl(card.reg(reg::spad(abi::SPAD_DP_HI))), 0);
    assert_eq!(q.readl(card.reg(reg::HOST_REQUEST)), 1);
    // Host writes are not echoed back.
    assert_quiet(&mut link);

    // Card -> host.
    q.writel(card.reg(reg::spad(7)), 0xdead_beef);
    match recv_skip_tables(&mut link) {
        DeviceMessage::RegWrite { offset, value } => {
            assert_eq!((offset, value), (reg::spad(7), 0xdead_beef))
        }
        m => panic!("expected REG_WRITE, got {m:?}"),
    }
    q.writel(card.reg(reg::SHUTDOWN_STATUS), 4);
    q.writel(card.reg(reg::CARD_STATE), 2);
    q.writel(card.reg(reg::HOST_REQUEST), 0);
    let mut got = Vec::new();
    for _ in 0..3 {
        match recv_skip_tables(&mut link) {
            DeviceMessage::RegWrite { offset, value } => got.push((offset, value)),
            m => panic!("expected REG_WRITE, got {m:?}"),
        }
    }
    assert_eq!(
        got,
        vec![
            (reg::SHUTDOWN_STATUS, 4),
            (reg::CARD_STATE, 2),
            (reg::HOST_REQUEST, 0)
        ]
    );
    assert_eq!(q.readl(card.reg(reg::spad(7))), 0xdead_beef);
    assert_eq!(q.readl(card.reg(reg::CARD_STATE)), 2);

    // A host write to a read-only register is refused and changes nothing.
    let err = link
        .request(&HostMessage::RegWrite {
            offset: reg::MAGIC,
            value: 1,
        })
        .unwrap_err();
    assert!(
        matches!(
            err,
            ProtocolError::Refused {
                request_type: 3,
                ..
            }
        ),
        "{err}"
    );
    assert_eq!(q.readl(card.reg(reg::MAGIC)), reg::MAGIC_VALUE);
}

#[test]
fn doorbell_eventfds_match_exactly() {
    let mut q = Qemu::start();
    let card = PciCard::setup(&mut q);
    let (mut link, _att) = connect(&q);
    let kick0 = eventfd();
    let kick1 = eventfd();
    let other_db = eventfd();
    for (db, value, e) in [(3, 0, &kick0), (3, 1, &kick1), (5, 0, &other_db)] {
        link.request(&HostMessage::SetDoorbellFd {
            doorbell: db,
            value,
            fd: Some(e.as_raw_fd()),
        })
        .unwrap();
    }

    q.writel(card.reg(reg::doorbell(3)), 1);
    assert_eq!(count(&kick1), 1);
    assert_eq!(count(&kick0), 0);
    assert_eq!(count(&other_db), 0);
    q.writel(card.reg(reg::doorbell(3)), 0);
    q.writel(card.reg(reg::doorbell(3)), 0);
    assert_eq!(count(&kick0), 2);
    assert_eq!(count(&kick1), 0);
    assert_eq!(count(&other_db), 0);
    // Matched writes are not forwarded.
    assert_quiet(&mut link);

    // An unmatched value on a doorbell with registrations, and a doorbell
    // without any, arrive as DOORBELL messages.
    q.writel(card.reg(reg::doorbell(3)), abi::DOORBELL_CONTROL);
    q.writel(card.reg(reg::doorbell(31)), 7);
    for want in [(3, abi::DOORBELL_CONTROL), (31, 7)] {
        match recv_skip_tables(&mut link) {
            DeviceMessage::Doorbell { doorbell, value } => assert_eq!((doorbell, value), want),
            m => panic!("expected DOORBELL, got {m:?}"),
        }
    }
    assert_eq!(count(&kick0) + count(&kick1) + count(&other_db), 0);

    // A second registration of the same (doorbell, value) replaces the first.
    let kick0b = eventfd();
    link.request(&HostMessage::SetDoorbellFd {
        doorbell: 3,
        value: 0,
        fd: Some(kick0b.as_raw_fd()),
    })
    .unwrap();
    q.writel(card.reg(reg::doorbell(3)), 0);
    assert_eq!(count(&kick0b), 1);
    assert_eq!(count(&kick0), 0);

    // Removal: the value is forwarded again.
    link.request(&HostMessage::SetDoorbellFd {
        doorbell: 3,
        value: 0,
        fd: None,
    })
    .unwrap();
    q.writel(card.reg(reg::doorbell(3)), 0);
    assert_eq!(count(&kick0b), 0);
    match recv_skip_tables(&mut link) {
        DeviceMessage::Doorbell { doorbell, value } => assert_eq!((doorbell, value), (3, 0)),
        m => panic!("expected DOORBELL, got {m:?}"),
    }
    // The other registration on the doorbell is untouched.
    q.writel(card.reg(reg::doorbell(3)), 1);
    assert_eq!(count(&kick1), 1);

    // Bad requests are refused.
    let e = eventfd();
    let err = link
        .request(&HostMessage::SetDoorbellFd {
            doorbell: abi::NUM_DOORBELLS,
            value: 0,
            fd: Some(e.as_raw_fd()),
        })
        .unwrap_err();
    assert!(
        matches!(err, ProtocolError::Refused { request_type: 6, errno, .. } if errno == libc::EINVAL as u32),
        "{err}"
    );
    let not_an_eventfd = std::fs::File::open("/dev/null").unwrap();
    let err = link
        .request(&HostMessage::SetDoorbellFd {
            doorbell: 1,
            value: 0,
            fd: Some(not_an_eventfd.as_raw_fd()),
        })
        .unwrap_err();
    assert!(
        matches!(
            err,
            ProtocolError::Refused {
                request_type: 6,
                ..
            }
        ),
        "{err}"
    );
    q.writel(card.reg(reg::doorbell(1)), 0);
    assert!(matches!(
        recv_skip_tables(&mut link),
        DeviceMessage::Doorbell {
            doorbell: 1,
            value: 0
        }
    ));
}

#[test]
fn vector_eventfds_raise_exactly_their_vector() {
    let mut q = Qemu::start();
    let card = PciCard::setup(&mut q);
    card.enable_msix(&mut q);
    let (mut link, _att) = connect(&q);
    let v5 = eventfd();
    let v5b = eventfd();
    let v9 = eventfd();
    for (vector, e) in [(5, &v5), (5, &v5b), (9, &v9)] {
        link.request(&HostMessage::SetVectorFd {
            vector,
            fd: Some(e.as_raw_fd()),
        })
        .unwrap();
    }
    assert!(card.take_fired(&mut q).is_empty());

    v5.write(1).unwrap();
    q.poll_readl(MSI_SINK + 4 * 5, T, |d| d != 0);
    assert_eq!(card.take_fired(&mut q), vec![5]);

    v9.write(1).unwrap();
    q.poll_readl(MSI_SINK + 4 * 9, T, |d| d != 0);
    assert_eq!(card.take_fired(&mut q), vec![9]);

    // A second fd on the same vector raises it too.
    v5b.write(1).unwrap();
    q.poll_readl(MSI_SINK + 4 * 5, T, |d| d != 0);
    assert_eq!(card.take_fired(&mut q), vec![5]);

    // RAISE_VECTOR, no eventfd involved.
    link.request(&HostMessage::RaiseVector(0)).unwrap();
    q.poll_readl(MSI_SINK, T, |d| d != 0);
    assert_eq!(card.take_fired(&mut q), vec![0]);

    // Removing the vector's fds: signals no longer arrive.
    link.request(&HostMessage::SetVectorFd {
        vector: 5,
        fd: None,
    })
    .unwrap();
    v5.write(1).unwrap();
    v5b.write(1).unwrap();
    std::thread::sleep(Duration::from_millis(200));
    assert!(card.take_fired(&mut q).is_empty());
    // ...while vector 9 still works.
    v9.write(1).unwrap();
    q.poll_readl(MSI_SINK + 4 * 9, T, |d| d != 0);
    assert_eq!(card.take_fired(&mut q), vec![9]);

    let err = link
        .request(&HostMessage::RaiseVector(abi::NUM_VECTORS))
        .unwrap_err();
    assert!(
        matches!(
            err,
            ProtocolError::Refused {
                request_type: 8,
                ..
            }
        ),
        "{err}"
    );
    let err = link
        .request(&HostMessage::SetVectorFd {
            vector: 40,
            fd: Some(v9.as_raw_fd()),
        })
        .unwrap_err();
    assert!(
        matches!(
            err,
            ProtocolError::Refused {
                request_type: 7,
                ..
            }
        ),
        "{err}"
    );
}

#[test]
fn masked_vector_is_held_until_unmasked() {
    let mut q = Qemu::start();
    let card = PciCard::setup(&mut q);
    card.enable_msix(&mut q);
    let (mut link, _att) = connect(&q);
    let e = eventfd();
    link.request(&HostMessage::SetVectorFd {
        vector: 6,
        fd: Some(e.as_raw_fd()),
    })
    .unwrap();

    card.mask_vector(&mut q, 6, true);
    e.write(1).unwrap();
    // The message is held: the pending bit is set, nothing is written.
    let deadline = std::time::Instant::now() + T;
    while !card.pending(&mut q, 6) && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    assert!(card.pending(&mut q, 6), "masked vector 6 not pending");
    std::thread::sleep(Duration::from_millis(100));
    assert!(card.take_fired(&mut q).is_empty());
    // RAISE_VECTOR follows the same rule.
    link.request(&HostMessage::RaiseVector(6)).unwrap();
    assert!(card.take_fired(&mut q).is_empty());

    card.mask_vector(&mut q, 6, false);
    assert_eq!(q.readl(MSI_SINK + 4 * 6), msi_data(6));
    assert!(!card.pending(&mut q, 6));
    assert_eq!(card.take_fired(&mut q), vec![6]);

    // Function mask (MSI-X control bit 14) holds every vector.
    let ctrl = cfg_read16(&mut q, card.dev, card.msix_cap + 2);
    cfg_write16(&mut q, card.dev, card.msix_cap + 2, ctrl | 0x4000);
    e.write(1).unwrap();
    std::thread::sleep(Duration::from_millis(200));
    assert!(card.take_fired(&mut q).is_empty());
    cfg_write16(&mut q, card.dev, card.msix_cap + 2, ctrl & !0x4000);
    assert_eq!(card.take_fired(&mut q), vec![6]);
}

#[test]
fn guest_ram_is_shared_both_ways() {
    let mut q = Qemu::start();
    let (mut link, att) = connect(&q);
    let table = att.ram.table().to_vec();
    assert!(!table.is_empty());
    assert!(table.len() <= 16);
    let covered: u64 = table.iter().map(|r| r.size).sum();
    assert!(
        covered >= RAM_SIZE - (1 << 20),
        "table covers only {covered:#x} bytes: {table:?}"
    );
    assert!(table
        .iter()
        .any(|r| r.gpa <= 0x200000 && r.gpa + r.size >= 0x400000));

    // Card writes, host reads.
    let pattern: Vec<u8> = (0..256u32).map(|i| (i * 7 + 1) as u8).collect();
    q.write(0x20_0000, &pattern);
    let mut buf = vec![0u8; 256];
    att.ram.read(0x20_0000, &mut buf).unwrap();
    assert_eq!(buf, pattern);
    // Near the top of RAM too.
    q.writel(RAM_SIZE - 8, 0x1234_5678);
    let mut w = [0u8; 4];
    att.ram.read(RAM_SIZE - 8, &mut w).unwrap();
    assert_eq!(u32::from_le_bytes(w), 0x1234_5678);

    // Host writes, card reads.
    att.ram
        .write(0x30_1000, b"written by the host side")
        .unwrap();
    assert_eq!(q.read(0x30_1000, 24), b"written by the host side");
    assert_quiet(&mut link);
}

#[test]
fn aperture_is_shared_both_ways_and_joins_the_table() {
    let mut q = Qemu::start();
    let (mut link, att) = connect(&q);
    // BAR2 not mapped yet: the table is RAM only.
    assert!(att
        .ram
        .table()
        .iter()
        .all(|r| r.gpa + r.size <= RAM_SIZE || r.gpa >= 0x1_0000_0000));
    assert_eq!(att.aperture.size(), APERTURE_SIZE);

    let card = PciCard::setup(&mut q);
    // Enabling memory decoding maps BAR2: a new table with the aperture.
    link.sync().unwrap();
    let mut last_table: Option<Vec<MemRegion>> = None;
    while link.has_pending() {
        match recv(&mut link) {
            DeviceMessage::MemTable(t) => {
                last_table = Some(t.iter().map(|(r, _)| *r).collect());
            }
            m => panic!("unexpected {m:?}"),
        }
    }
    let table = last_table.expect("no MEM_TABLE after BAR2 was mapped");
    let ap = table
        .iter()
        .find(|r| r.gpa == BAR2_ADDR)
        .unwrap_or_else(|| panic!("aperture missing from {table:?}"));
    assert_eq!(ap.size, APERTURE_SIZE);
    assert_eq!(ap.fd_offset, 0);

    // Host writes through its aperture mapping; the card reads through BAR2.
    att.aperture
        .write(0x1000, &0xc0ff_ee00u32.to_le_bytes())
        .unwrap();
    att.aperture
        .write(APERTURE_SIZE - 4, &[1, 2, 3, 4])
        .unwrap();
    assert_eq!(q.readl(BAR2_ADDR + 0x1000), 0xc0ff_ee00);
    assert_eq!(q.read(BAR2_ADDR + APERTURE_SIZE - 4, 4), [1, 2, 3, 4]);
    // The card writes through BAR2; the host reads its mapping.
    q.write(BAR2_ADDR + 0x2008, b"card");
    q.writeq(BAR2_ADDR + 0x3000, 0x0102_0304_0506_0708);
    let mut b = [0u8; 4];
    att.aperture.read(0x2008, &mut b).unwrap();
    assert_eq!(&b, b"card");
    let mut qw = [0u8; 8];
    att.aperture.read(0x3000, &mut qw).unwrap();
    assert_eq!(u64::from_le_bytes(qw), 0x0102_0304_0506_0708);
    let _ = card;

    // Moving BAR2 moves the aperture in the table.
    const MOVED: u64 = 0xd000_0000;
    cfg_write32(&mut q, card.dev, 0x18, MOVED as u32);
    link.sync().unwrap();
    let mut moved = None;
    while link.has_pending() {
        if let DeviceMessage::MemTable(t) = recv(&mut link) {
            moved = Some(t.iter().map(|(r, _)| *r).collect::<Vec<_>>());
        }
    }
    let t = moved.expect("no MEM_TABLE after BAR2 moved");
    assert!(
        t.iter().any(|r| r.gpa == MOVED && r.size == APERTURE_SIZE),
        "{t:?}"
    );
    assert!(t.iter().all(|r| r.gpa != BAR2_ADDR), "{t:?}");
    assert_eq!(q.read(MOVED + 0x2008, 4), b"card");

    // Disabling memory decoding removes the aperture from the table.
    let cmd = cfg_read16(&mut q, card.dev, 0x04);
    cfg_write16(&mut q, card.dev, 0x04, cmd & !0x2);
    link.sync().unwrap();
    let mut last = None;
    while link.has_pending() {
        if let DeviceMessage::MemTable(t) = recv(&mut link) {
            last = Some(t.iter().map(|(r, _)| *r).collect::<Vec<_>>());
        }
    }
    let t = last.expect("no MEM_TABLE after BAR2 was unmapped");
    assert!(t.iter().all(|r| r.gpa != BAR2_ADDR), "{t:?}");
}

#[test]
fn host_side_reconnects_while_qemu_runs() {
    let mut q = Qemu::start();
    let card = PciCard::setup(&mut q);
    card.enable_msix(&mut q);
    let db_fd = eventfd();
    let irq_fd = eventfd();
    {
        let (mut link, _att) = connect(&q);
        link.request(&HostMessage::RegWrite {
            offset: reg::spad(abi::SPAD_DP_LO),
            value: 0x1000,
        })
        .unwrap();
        link.request(&HostMessage::SetDoorbellFd {
            doorbell: 2,
            value: 0,
            fd: Some(db_fd.as_raw_fd()),
        })
        .unwrap();
        link.request(&HostMessage::SetVectorFd {
            vector: 4,
            fd: Some(irq_fd.as_raw_fd()),
        })
        .unwrap();
        q.writel(card.reg(reg::doorbell(2)), 0);
        assert_eq!(count(&db_fd), 1);
        // The host side goes away.
    }
    // While nobody is connected the card keeps running: register writes are
    // stored, unmatched doorbells are dropped, registrations are gone.
    let deadline = std::time::Instant::now() + T;
    loop {
        q.writel(card.reg(reg::doorbell(2)), 0);
        if count(&db_fd) == 0 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "doorbell eventfd kept after disconnect"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    q.writel(card.reg(reg::CARD_STATE), 2);
    q.writel(card.reg(reg::spad(3)), 33);
    irq_fd.write(1).unwrap();
    std::thread::sleep(Duration::from_millis(100));
    assert!(
        card.take_fired(&mut q).is_empty(),
        "vector fd kept after disconnect"
    );

    // A new host side attaches and learns the registers from HELLO.
    let (mut link, att) = connect(&q);
    assert_eq!(att.hello.card_state, 2);
    assert_eq!(att.hello.spads[3], 33);
    assert_eq!(att.hello.device_page_offset(), Some(0x1000));
    // Its table includes the aperture (BAR2 is mapped).
    assert!(att
        .ram
        .table()
        .iter()
        .any(|r| r.gpa == BAR2_ADDR && r.size == APERTURE_SIZE));
    // The old registration is gone: the write arrives as a message...
    q.writel(card.reg(reg::doorbell(2)), 0);
    match recv_skip_tables(&mut link) {
        DeviceMessage::Doorbell { doorbell, value } => assert_eq!((doorbell, value), (2, 0)),
        m => panic!("expected DOORBELL, got {m:?}"),
    }
    assert_eq!(count(&db_fd), 0);
    // ...and everything works again after registering anew.
    let db2 = eventfd();
    let irq2 = eventfd();
    link.request(&HostMessage::SetDoorbellFd {
        doorbell: 2,
        value: 0,
        fd: Some(db2.as_raw_fd()),
    })
    .unwrap();
    link.request(&HostMessage::SetVectorFd {
        vector: 4,
        fd: Some(irq2.as_raw_fd()),
    })
    .unwrap();
    q.writel(card.reg(reg::doorbell(2)), 0);
    assert_eq!(count(&db2), 1);
    irq2.write(1).unwrap();
    q.poll_readl(MSI_SINK + 16, T, |d| d != 0);
    assert_eq!(card.take_fired(&mut q), vec![4]);
    q.writel(card.reg(reg::spad(9)), 99);
    match recv_skip_tables(&mut link) {
        DeviceMessage::RegWrite { offset, value } => {
            assert_eq!((offset, value), (reg::spad(9), 99))
        }
        m => panic!("expected REG_WRITE, got {m:?}"),
    }
    att.aperture.write(0x40, b"again").unwrap();
    assert_eq!(q.read(BAR2_ADDR + 0x40, 5), b"again");
    att.ram.write(0x10_0000, b"ram").unwrap();
    assert_eq!(q.read(0x10_0000, 3), b"ram");

    // Several reconnects in a row.
    drop(link);
    for i in 0..3u32 {
        let (mut link, att) = connect(&q);
        assert_eq!(att.hello.spads[3], 33);
        link.request(&HostMessage::RegWrite {
            offset: reg::spad(0),
            value: i,
        })
        .unwrap();
        assert_eq!(q.readl(card.reg(reg::spad(0))), i);
    }
}

#[test]
fn messages_before_host_hello_are_ignored() {
    let q = Qemu::start();
    let mut link = DeviceLink::connect_retry(&q.device_socket(), T).unwrap();
    link.set_read_timeout(Some(T)).unwrap();
    // REG_WRITE and SYNC before HELLO: ignored, so no SYNC answer.
    link.send(&HostMessage::RegWrite {
        offset: reg::spad(1),
        value: 5,
    })
    .unwrap();
    link.send(&HostMessage::Sync(77)).unwrap();
    let m = recv(&mut link);
    assert!(matches!(m, DeviceMessage::Hello(..)), "{m:?}");
    assert!(matches!(recv(&mut link), DeviceMessage::MemTable(_)));
    link.send(&HostMessage::Hello).unwrap();
    link.sync().unwrap();
    assert!(!link.has_pending());
    drop(link);
    let (_link, att) = connect(&q);
    assert_eq!(
        att.hello.spads[1], 0,
        "a REG_WRITE before HELLO took effect"
    );
}

#[test]
fn card_reset_clears_state_and_is_reported() {
    let mut q = Qemu::start();
    let card = PciCard::setup(&mut q);
    let (mut link, _att) = connect(&q);
    for (off, v) in [
        (reg::spad(abi::SPAD_DP_LO), 0x1000),
        (reg::spad(abi::SPAD_DP_HI), 1),
        (reg::spad(5), 55),
        (reg::CARD_STATE, 2),
        (reg::SHUTDOWN_STATUS, 4),
        (reg::HOST_REQUEST, 1),
    ] {
        link.request(&HostMessage::RegWrite {
            offset: off,
            value: v,
        })
        .unwrap();
    }
    let db = eventfd();
    link.request(&HostMessage::SetDoorbellFd {
        doorbell: 0,
        value: 1,
        fd: Some(db.as_raw_fd()),
    })
    .unwrap();

    // Hard reset through the reset control register (as a guest reboot).
    q.outb(0xcf9, 0x06);
    let deadline = std::time::Instant::now() + T;
    let ev = loop {
        match recv(&mut link) {
            DeviceMessage::CardEvent(e) => break e,
            DeviceMessage::MemTable(_) => {}
            m => panic!("unexpected {m:?}"),
        }
        assert!(std::time::Instant::now() < deadline);
    };
    assert_eq!(ev, CardEvent::Reset);
    // The reset unprogrammed the BARs: set them up again.
    let card2 = PciCard::setup(&mut q);
    assert_eq!(card2.dev, card.dev);
    assert_eq!(q.readl(card.reg(reg::spad(abi::SPAD_DP_LO))), 0);
    assert_eq!(q.readl(card.reg(reg::spad(abi::SPAD_DP_HI))), 0);
    assert_eq!(q.readl(card.reg(reg::CARD_STATE)), 0);
    assert_eq!(q.readl(card.reg(reg::HOST_REQUEST)), 0);
    assert_eq!(
        q.readl(card.reg(reg::SHUTDOWN_STATUS)),
        4,
        "SHUTDOWN_STATUS survives reset"
    );
    assert_eq!(
        q.readl(card.reg(reg::spad(5))),
        55,
        "other scratchpads survive reset"
    );
    // Registrations were dropped.
    q.writel(card.reg(reg::doorbell(0)), 1);
    assert_eq!(count(&db), 0);
    match recv_skip_tables(&mut link) {
        DeviceMessage::Doorbell { doorbell, value } => assert_eq!((doorbell, value), (0, 1)),
        m => panic!("expected DOORBELL, got {m:?}"),
    }
    // MSI-X works after the reset (vectors are in use again).
    card2.enable_msix(&mut q);
    link.request(&HostMessage::RaiseVector(3)).unwrap();
    q.poll_readl(MSI_SINK + 12, T, |d| d != 0);
    assert_eq!(card2.take_fired(&mut q), vec![3]);
}

#[test]
fn run_stop_reset_and_quit_through_qmp() {
    let args = QemuArgs {
        qmp: true,
        ..Default::default()
    };
    let mut q = Qemu::start_with(&args);
    let mut qmp = q.qmp();
    let (mut link, att) = connect(&q);
    assert!(att.hello.running);
    let next_event = |link: &mut DeviceLink| match recv_skip_tables(link) {
        DeviceMessage::CardEvent(e) => e,
        m => panic!("expected CARD_EVENT, got {m:?}"),
    };
    qmp.execute("stop");
    assert_eq!(next_event(&mut link), CardEvent::Stop);
    qmp.execute("cont");
    assert_eq!(next_event(&mut link), CardEvent::Run);
    link.request(&HostMessage::RegWrite {
        offset: reg::spad(abi::SPAD_DP_LO),
        value: 0x1000,
    })
    .unwrap();
    qmp.execute("system_reset");
    assert_eq!(next_event(&mut link), CardEvent::Reset);
    let card = PciCard::setup(&mut q);
    assert_eq!(q.readl(card.reg(reg::spad(abi::SPAD_DP_LO))), 0);
    qmp.execute("quit");
    let mut events = Vec::new();
    loop {
        match link.recv() {
            Ok(DeviceMessage::CardEvent(e)) => events.push(e),
            Ok(DeviceMessage::MemTable(_)) => {}
            Ok(m) => panic!("unexpected {m:?}"),
            Err(ProtocolError::Closed) => break,
            Err(e) => panic!("{e}"),
        }
    }
    assert_eq!(
        events.first(),
        Some(&CardEvent::PowerOff),
        "events: {events:?}"
    );
    assert!(q.wait_exit(T).success());
}

#[test]
fn poweroff_is_reported_before_qemu_exits() {
    let mut q = Qemu::start();
    let (mut link, _att) = connect(&q);
    q.terminate();
    let mut events = Vec::new();
    loop {
        match link.recv() {
            Ok(DeviceMessage::CardEvent(e)) => events.push(e),
            Ok(DeviceMessage::MemTable(_)) => {}
            Ok(m) => panic!("unexpected {m:?}"),
            Err(ProtocolError::Closed) => break,
            Err(e) => panic!("{e}"),
        }
    }
    assert!(events.contains(&CardEvent::PowerOff), "events: {events:?}");
}

#[test]
fn hello_says_whether_the_vcpus_run() {
    let args = QemuArgs {
        extra: vec!["-S".into()],
        ..Default::default()
    };
    let q = Qemu::start_with(&args);
    let (_link, att) = connect(&q);
    assert!(!att.hello.running, "started with -S: vCPUs are not running");
    let q = Qemu::start();
    let (_link, att) = connect(&q);
    assert!(att.hello.running);
}

#[test]
fn one_host_side_at_a_time() {
    let q = Qemu::start();
    let (mut first, _att) = connect(&q);
    // A second client is not served while the first is attached.
    let mut second = DeviceLink::connect_retry(&q.device_socket(), T).unwrap();
    second
        .set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    assert!(second.recv().is_err(), "a second host side was served");
    first.sync().unwrap();
    drop(first);
    // Once the first is gone, the waiting one is served.
    second.set_read_timeout(Some(T)).unwrap();
    let att = second
        .attach()
        .expect("waiting client attaches after the first left");
    assert_eq!(att.hello.node_id, 3);
    second.sync().unwrap();
}

/// Raw bytes on the device socket, next to a `DeviceLink` on the same stream.
fn raw_link(q: &Qemu) -> (DeviceLink, UnixStream) {
    let stream = UnixStream::connect(q.device_socket()).unwrap();
    let raw = stream.try_clone().unwrap();
    let mut link = DeviceLink::from_stream(stream);
    link.set_read_timeout(Some(T)).unwrap();
    link.attach().unwrap();
    (link, raw)
}

fn frame(ty: u32, payload: &[u8]) -> Vec<u8> {
    let mut v = ty.to_le_bytes().to_vec();
    v.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    v.extend_from_slice(payload);
    v
}

fn assert_closed(link: &mut DeviceLink) {
    loop {
        match link.recv() {
            Err(ProtocolError::Closed) => return,
            Ok(DeviceMessage::MemTable(_)) => {}
            other => panic!("expected the device to close the connection, got {other:?}"),
        }
    }
}

#[test]
fn unknown_messages_are_skipped_and_broken_ones_disconnect() {
    let mut q = Qemu::start();
    let card = PciCard::setup(&mut q);
    {
        let (mut link, mut raw) = raw_link(&q);
        // Unknown type with a payload: skipped, the stream stays in sync.
        raw.write_all(&frame(99, &[0xee; 40])).unwrap();
        raw.write_all(&frame(98, &[])).unwrap();
        link.request(&HostMessage::RegWrite {
            offset: reg::spad(4),
            value: 44,
        })
        .unwrap();
        assert_eq!(q.readl(card.reg(reg::spad(4))), 44);
        // A payload too short for its type is a protocol error.
        raw.write_all(&frame(3, &[1, 2, 3])).unwrap();
        assert_closed(&mut link);
    }
    {
        let (mut link, mut raw) = raw_link(&q);
        // A payload over 4096 bytes is a protocol error.
        raw.write_all(&[0x63, 0, 0, 0, 0x01, 0x10, 0, 0]).unwrap();
        assert_closed(&mut link);
    }
    {
        // A HELLO of another major version closes the connection.
        let mut stream = UnixStream::connect(q.device_socket()).unwrap();
        stream
            .write_all(&frame(1, &0x0002_0000u32.to_le_bytes()))
            .unwrap();
        let mut link = DeviceLink::from_stream(stream);
        link.set_read_timeout(Some(T)).unwrap();
        assert!(matches!(recv(&mut link), DeviceMessage::Hello(..)));
        assert_closed(&mut link);
    }
    // The device still serves a well-behaved host side.
    let (mut link, att) = connect(&q);
    assert_eq!(att.hello.spads[4], 44);
    q.writel(card.reg(reg::spad(4)), 45);
    assert!(matches!(
        recv_skip_tables(&mut link),
        DeviceMessage::RegWrite { offset, value: 45 } if offset == reg::spad(4)
    ));
}

fn assert_one_line_error(args: QemuArgs, needle: &str) {
    let (st, err) = run_qemu_expecting_exit(&args, Duration::from_secs(20));
    assert!(
        !st.success(),
        "QEMU accepted a bad configuration; stderr: {err}"
    );
    let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "expected one error line, got: {err}");
    assert!(
        lines[0].contains(needle),
        "error line does not mention {needle:?}: {err}"
    );
}

#[test]
fn startup_without_shared_ram_fails_with_one_line() {
    let a = QemuArgs {
        shared_ram: false,
        ..Default::default()
    };
    assert_one_line_error(a, "memory-backend-memfd");
    let a = QemuArgs {
        ram_share_off: true,
        ..Default::default()
    };
    assert_one_line_error(a, "share=on");
}

#[test]
fn startup_without_chardev_fails_with_one_line() {
    let a = QemuArgs {
        chardev: false,
        device: Some("mic-x100".into()),
        ..Default::default()
    };
    assert_one_line_error(a, "chardev");
    // A chardev that cannot pass fds.
    let a = QemuArgs {
        chardev: false,
        extra: vec!["-chardev".into(), "null,id=mic0".into()],
        ..Default::default()
    };
    assert_one_line_error(a, "UNIX socket");
}

#[test]
fn startup_with_bad_properties_fails_with_one_line() {
    for (dev, needle) in [
        ("mic-x100,chardev=mic0,aperture-size=3M", "aperture-size"),
        ("mic-x100,chardev=mic0,node-id=300", "node-id"),
        ("mic-x100,chardev=mic0,stepping=5", "stepping"),
        (
            "mic-x100,chardev=mic0,no-such-property=1",
            "no-such-property",
        ),
    ] {
        let a = QemuArgs {
            device: Some(dev.into()),
            ..Default::default()
        };
        assert_one_line_error(a, needle);
    }
}

#[test]
fn device_help_lists_properties() {
    let out = std::process::Command::new(qemu())
        .args(["-device", "mic-x100,help"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    for p in ["chardev=", "aperture-size=", "node-id=", "stepping="] {
        assert!(text.contains(p), "{p} missing from: {text}");
    }
}

#[test]
fn qemu_as_client_reconnects_to_a_listening_host_side() {
    let dir = TempDir::new("client");
    let path = dir.join("host.sock");
    let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
    let args = QemuArgs {
        chardev: false,
        extra: vec![
            "-chardev".into(),
            format!("socket,id=mic0,path={},reconnect-ms=100", path.display()),
        ],
        ..Default::default()
    };
    let mut q = Qemu::start_with(&args);
    let card = PciCard::setup(&mut q);
    let accept = |l: &std::os::unix::net::UnixListener| {
        let (s, _) = l.accept().unwrap();
        let mut link = DeviceLink::from_stream(s);
        link.set_read_timeout(Some(T)).unwrap();
        let att = link.attach().unwrap();
        link.sync().unwrap();
        (link, att)
    };
    let (mut link, _att) = accept(&listener);
    link.request(&HostMessage::RegWrite {
        offset: reg::spad(6),
        value: 66,
    })
    .unwrap();
    assert_eq!(q.readl(card.reg(reg::spad(6))), 66);
    drop(link);
    // QEMU connects again by itself and sends HELLO with the stored registers.
    let (mut link, att) = accept(&listener);
    assert_eq!(att.hello.spads[6], 66);
    q.writel(card.reg(reg::spad(6)), 67);
    assert!(matches!(
        recv_skip_tables(&mut link),
        DeviceMessage::RegWrite { offset, value: 67 } if offset == reg::spad(6)
    ));
}
