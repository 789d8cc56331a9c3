#!/usr/bin/env python3
"""Minimal host side of the MIC X100 VOP transport, for checking the card image.

Connects to the mic-x100 device's socket (docs/device-protocol.md), builds a
device page (docs/vop-abi.md) with a virtio console, a virtio block device
(RAM disk) and a virtio net device (no data path), serves the console and
block queues through DOORBELL/RAISE_VECTOR messages, and runs a scripted
scenario against the card: shell round trip over the console, block I/O,
config change, hot removal, hot add and host-requested shutdown.

Standard library only. Prints "minihost: PASS ..." / "minihost: FAIL ..."
lines and exits 0 when every check passed.

The ABI and protocol constants and the device page's struct layouts are read
from their definition, the card driver's header
guest-images/driver/mic_x100_vop.h; virtio's constants from the system's
<linux/virtio_*.h> (linux-libc-dev).
"""

import argparse
import hashlib
import mmap
import os
import re
import select
import socket
import struct
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ABI_HEADER = os.path.join(HERE, "..", "driver", "mic_x100_vop.h")
VIRTIO_HEADERS = ["virtio_ids.h", "virtio_config.h", "virtio_ring.h", "virtio_blk.h", "virtio_net.h"]
LINUX_INCLUDE = os.environ.get("LINUX_INCLUDE", "/usr/include/linux")


def _c_source(path):
    with open(path) as f:
        text = f.read()
    text = re.sub(r"/\*.*?\*/", " ", text, flags=re.S)
    return re.sub(r"//[^\n]*", "", text)


def read_defines(path, into):
    """Adds the object-like #defines of a C header whose values are integer
    expressions (of numbers and earlier defines) to `into`."""
    for m in re.finditer(r"^[ \t]*#define[ \t]+([A-Za-z_]\w*)[ \t]+([^\n]+)$", _c_source(path), re.M):
        name, expr = m.group(1), m.group(2).strip()
        expr = re.sub(r"\b(0[xX][0-9a-fA-F]+|\d+)[uUlL]+\b", r"\1", expr)
        if not re.fullmatch(r"[\w\s()+\-*/<>|&~^]+", expr):
            continue
        try:
            into[name] = int(eval(expr.replace("/", "//"), {"__builtins__": {}}, dict(into)))
        except Exception:
            pass
    return into


_CTYPES = {"__u8": 1, "__s8": 1, "char": 1, "__le16": 2, "__le32": 4, "__le64": 8}


def read_structs(path, defines):
    """Layouts of the header's packed structs: name -> (size, {field: offset})."""
    structs = {}
    for m in re.finditer(r"struct\s+(\w+)\s*\{(.*?)\}", _c_source(path), re.S):
        off, fields = 0, {}
        for decl in m.group(2).split(";"):
            f = re.fullmatch(r"\s*(?:struct\s+)?(\w+)\s+(\w+)\s*(?:\[(\w*)\])?\s*", decl)
            if not f:
                continue
            ctype, name, count = f.groups()
            size = _CTYPES[ctype] if ctype in _CTYPES else structs[ctype][0]
            n = 1 if count is None else 0 if count == "" else defines[count] if count in defines else int(count, 0)
            fields[name] = off
            off += size * n
        structs[m.group(1)] = (off, fields)
    return structs


ABI = read_defines(ABI_HEADER, {})
LAYOUT = read_structs(ABI_HEADER, ABI)
VIRTIO = {}
for _h in VIRTIO_HEADERS:
    read_defines(os.path.join(LINUX_INCLUDE, _h), VIRTIO)

BOOT_SIZE, BOOT = LAYOUT["mic_bootparam"]
DESC_SIZE, DESC = LAYOUT["mic_device_desc"]
VQC_SIZE, VQC = LAYOUT["mic_vqconfig"]
CTRL_SIZE, CTRL = LAYOUT["mic_device_ctrl"]
VRING_INFO = LAYOUT["mic_vring_info"][1]
MEM_TABLE_HEAD = LAYOUT["mic_msg_mem_table"][0]
MEM_REGION_SIZE = LAYOUT["mic_msg_mem_region"][0]

MIC_MAGIC = ABI["MIC_MAGIC"]
DP_OFF = ABI["MIC_DP_DEFAULT_OFFSET"]
DP_SIZE = ABI["MIC_DP_SIZE"]
ALIGN = ABI["MIC_VIRTIO_RING_ALIGN"]

# registers
CARD_STATE, SHUTDOWN_STATUS, HOST_REQUEST = (
    ABI["MIC_REG_CARD_STATE"],
    ABI["MIC_REG_SHUTDOWN_STATUS"],
    ABI["MIC_REG_HOST_REQUEST"],
)


def SPAD(i):
    return ABI["MIC_REG_SPAD_BASE"] + 4 * i


# message types
HELLO, MEM_TABLE, REG_WRITE, DOORBELL, CARD_EVENT = (
    ABI["MIC_MSG_" + n] for n in ("HELLO", "MEM_TABLE", "REG_WRITE", "DOORBELL", "CARD_EVENT")
)
SET_DOORBELL_FD, SET_VECTOR_FD, RAISE_VECTOR, SYNC, ERROR = (
    ABI["MIC_MSG_" + n] for n in ("SET_DOORBELL_FD", "SET_VECTOR_FD", "RAISE_VECTOR", "SYNC", "ERROR")
)

VIRTIO_NET, VIRTIO_BLK, VIRTIO_CONSOLE = VIRTIO["VIRTIO_ID_NET"], VIRTIO["VIRTIO_ID_BLOCK"], VIRTIO["VIRTIO_ID_CONSOLE"]
F_VERSION_1 = 1 << VIRTIO["VIRTIO_F_VERSION_1"]
NET_F_MAC = 1 << VIRTIO["VIRTIO_NET_F_MAC"]
BLK_F_SEG_MAX = 1 << VIRTIO["VIRTIO_BLK_F_SEG_MAX"]
STATUS_DRIVER_OK = VIRTIO["VIRTIO_CONFIG_S_DRIVER_OK"]
STATUS_FEATURES_OK = VIRTIO["VIRTIO_CONFIG_S_FEATURES_OK"]
BLK_T_IN, BLK_T_OUT, BLK_T_FLUSH, BLK_T_GET_ID = (
    VIRTIO["VIRTIO_BLK_T_" + n] for n in ("IN", "OUT", "FLUSH", "GET_ID")
)
BLK_S_UNSUPP = VIRTIO["VIRTIO_BLK_S_UNSUPP"]

VRING_DESC_F_NEXT, VRING_DESC_F_WRITE = VIRTIO["VRING_DESC_F_NEXT"], VIRTIO["VRING_DESC_F_WRITE"]


def desc_size(num_vq, feature_len, config_len):
    """mic_desc_size(): a descriptor without its control block"""
    return (DESC_SIZE + VQC_SIZE * num_vq + 2 * feature_len + config_len + 7) & ~7


def desc_total(num_vq, feature_len, config_len):
    """mic_total_desc_size(): from a descriptor to the next"""
    return desc_size(num_vq, feature_len, config_len) + CTRL_SIZE


def vring_size(num):
    s = 16 * num + 6 + 2 * num
    s = (s + ALIGN - 1) & ~(ALIGN - 1)
    return s + 6 + 8 * num


def log(*a):
    print("minihost:", *a, flush=True)


class Conn:
    def __init__(self, path):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        deadline = time.time() + 30
        while True:
            try:
                self.sock.connect(path)
                break
            except OSError:
                if time.time() > deadline:
                    raise
                time.sleep(0.1)
        self.buf = b""
        self.fds = []

    def send(self, mtype, payload=b"", fds=()):
        data = struct.pack("<II", mtype, len(payload)) + payload
        anc = []
        if fds:
            anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack("%di" % len(fds), *fds))]
        self.sock.sendmsg([data], anc)

    def fill(self):
        data, anc, _, _ = self.sock.recvmsg(65536, socket.CMSG_SPACE(16 * 4))
        if not data:
            raise EOFError("device closed the connection")
        for level, typ, cd in anc:
            if level == socket.SOL_SOCKET and typ == socket.SCM_RIGHTS:
                n = len(cd) // 4
                self.fds.extend(struct.unpack("%di" % n, cd[: 4 * n]))
        self.buf += data

    def messages(self):
        while len(self.buf) >= 8:
            mtype, size = struct.unpack_from("<II", self.buf)
            if len(self.buf) < 8 + size:
                return
            payload = self.buf[8 : 8 + size]
            self.buf = self.buf[8 + size :]
            yield mtype, payload


class Mem:
    """card RAM regions from MEM_TABLE"""

    def __init__(self):
        self.regions = []

    def set(self, regions):
        self.regions = regions

    def _find(self, gpa, n):
        for base, size, m in self.regions:
            if base <= gpa and gpa + n <= base + size:
                return m, gpa - base
        raise ValueError("gpa 0x%x+%d not in card RAM" % (gpa, n))

    def read(self, gpa, n):
        m, o = self._find(gpa, n)
        return m[o : o + n]

    def write(self, gpa, data):
        m, o = self._find(gpa, len(data))
        m[o : o + len(data)] = data


class Ring:
    def __init__(self, ap, off, num):
        self.ap, self.off, self.num = ap, off, num
        self.avail = off + 16 * num
        self.used = (self.avail + 6 + 2 * num + ALIGN - 1) & ~(ALIGN - 1)
        self.last_avail = 0

    def reset(self):
        self.ap[self.off : self.off + vring_size(self.num)] = bytes(vring_size(self.num))
        self.last_avail = 0

    def avail_idx(self):
        return struct.unpack_from("<H", self.ap, self.avail + 2)[0]

    def pop(self):
        """-> (head, [(addr, len, flags)]) or None"""
        if self.last_avail == self.avail_idx():
            return None
        head = struct.unpack_from("<H", self.ap, self.avail + 4 + 2 * (self.last_avail % self.num))[0]
        self.last_avail = (self.last_avail + 1) & 0xFFFF
        chain, i, n = [], head, 0
        while True:
            addr, ln, flags, nxt = struct.unpack_from("<QIHH", self.ap, self.off + 16 * i)
            chain.append((addr, ln, flags))
            n += 1
            if not flags & VRING_DESC_F_NEXT or n > self.num:
                break
            i = nxt
        return head, chain

    def push(self, head, written):
        idx = struct.unpack_from("<H", self.ap, self.used + 2)[0]
        struct.pack_into("<II", self.ap, self.used + 4 + 8 * (idx % self.num), head, written)
        struct.pack_into("<H", self.ap, self.used + 2, (idx + 1) & 0xFFFF)


class Device:
    def __init__(self, host, type_, num_vq, features, config, num=256):
        self.host, self.type, self.num_vq = host, type_, num_vq
        self.features, self.config, self.num = features, config, num
        self.feature_len = ABI["MIC_HOST_FEATURE_LEN"]
        self.rings = []
        self.pos = None
        self.c2h_db = None
        self.removed = False
        self.started = False

    @property
    def ap(self):
        return self.host.ap

    def desc_size(self):
        return desc_size(self.num_vq, self.feature_len, len(self.config))

    def total(self):
        return desc_total(self.num_vq, self.feature_len, len(self.config))

    def ctrl(self):
        return self.pos + self.desc_size()

    def features_off(self):
        return self.pos + DESC_SIZE + VQC_SIZE * self.num_vq

    def cfg_off(self):
        return self.features_off() + 2 * self.feature_len

    def rd8(self, off):
        return self.ap[off]

    def wr8(self, off, v):
        self.ap[off] = v & 0xFF

    def status(self):
        return self.rd8(self.pos + DESC["status"])

    def h2c(self):
        v = self.rd8(self.ctrl() + CTRL["h2c_vdev_db"])
        return v - 256 if v > 127 else v

    def raise_irq(self):
        v = self.h2c()
        if v >= 0:
            self.host.conn.send(RAISE_VECTOR, struct.pack("<I", v))

    def write_desc(self, pos, c2h_db, ring_offs):
        ap = self.ap
        self.pos, self.c2h_db = pos, c2h_db
        ap[pos : pos + self.total()] = bytes(self.total())
        ap[pos + DESC["num_vq"]] = self.num_vq
        ap[pos + DESC["feature_len"]] = self.feature_len
        ap[pos + DESC["config_len"]] = len(self.config)
        self.rings = []
        for i, ro in enumerate(ring_offs):
            q = pos + DESC_SIZE + VQC_SIZE * i
            struct.pack_into("<Q", ap, q + VQC["address"], ro)
            struct.pack_into("<H", ap, q + VQC["num"], self.num)
            r = Ring(ap, ro, self.num)
            r.reset()
            magic = (MIC_MAGIC + self.type + i) & 0xFFFFFFFF
            struct.pack_into("<I", ap, ro + vring_size(self.num) + VRING_INFO["magic"], magic)
            self.rings.append(r)
        fo = self.features_off()
        ap[fo : fo + 8] = struct.pack("<Q", self.features)
        co = self.cfg_off()
        ap[co : co + len(self.config)] = self.config
        c = self.ctrl()
        struct.pack_into("<b", ap, c + CTRL["c2h_vdev_db"], c2h_db)
        struct.pack_into("<b", ap, c + CTRL["h2c_vdev_db"], -1)
        # the type last (x86 stores are ordered)
        struct.pack_into("<b", ap, pos + DESC["type"], self.type)

    def acked(self):
        fo = self.features_off() + self.feature_len
        return struct.unpack_from("<Q", self.ap, fo)[0]

    def control(self):
        c = self.ctrl()
        if self.rd8(c + CTRL["vdev_reset"]) == 1:
            log("device type %d: reset requested" % self.type)
            for r in self.rings:
                r.reset()
            self.wr8(self.pos + DESC["status"], 0)
            self.wr8(c + CTRL["vdev_reset"], 0)
            self.wr8(c + CTRL["host_ack"], 1)
            self.on_reset()
        st = self.status()
        if st & STATUS_DRIVER_OK and not self.started:
            self.started = True
            log("device type %d: DRIVER_OK, acked features 0x%x" % (self.type, self.acked()))
            self.host.events.append(("driver_ok", self.type))
            for q in range(self.num_vq):
                self.kick(q)
        if not st & STATUS_DRIVER_OK:
            self.started = False

    def on_reset(self):
        pass

    def kick(self, q):
        pass


class Console(Device):
    def __init__(self, host):
        super().__init__(host, VIRTIO_CONSOLE, 2, F_VERSION_1, struct.pack("<HHII", 0, 0, 1, 0))
        self.out = b""
        self.pending_in = b""

    def kick(self, q):
        if not self.started:
            return
        did = False
        if q == 1:
            while True:
                e = self.rings[1].pop()
                if not e:
                    break
                head, chain = e
                for addr, ln, flags in chain:
                    if not flags & VRING_DESC_F_WRITE:
                        self.out += bytes(self.host.mem.read(addr, ln))
                self.rings[1].push(head, 0)
                did = True
        if self.pending_in:
            did |= self.feed()
        if did:
            self.raise_irq()

    def feed(self):
        did = False
        while self.pending_in:
            e = self.rings[0].pop()
            if not e:
                break
            head, chain = e
            addr, ln, flags = chain[0]
            chunk = self.pending_in[:ln]
            self.pending_in = self.pending_in[len(chunk) :]
            self.host.mem.write(addr, chunk)
            self.rings[0].push(head, len(chunk))
            did = True
        return did

    def type_in(self, s):
        self.pending_in += s.encode()
        if self.started and self.feed():
            self.raise_irq()


class Blk(Device):
    def __init__(self, host, sectors=2048):
        cfg = struct.pack("<QII", sectors, 0, 126)  # capacity, size_max, seg_max
        super().__init__(host, VIRTIO_BLK, 1, F_VERSION_1 | BLK_F_SEG_MAX, cfg, num=128)
        self.disk = bytearray(sectors * 512)
        self.reqs = 0

    def kick(self, q):
        if not self.started:
            return
        did = False
        while True:
            e = self.rings[0].pop()
            if not e:
                break
            head, chain = e
            hdr = bytes(self.host.mem.read(chain[0][0], 16))
            typ, _, sector = struct.unpack("<IIQ", hdr)
            data = chain[1:-1]
            st_addr = chain[-1][0]
            off = sector * 512
            written = 0
            status = 0
            for addr, ln, flags in data:
                if typ == BLK_T_IN:
                    self.host.mem.write(addr, bytes(self.disk[off : off + ln]))
                    written += ln
                elif typ == BLK_T_OUT:
                    self.disk[off : off + ln] = bytes(self.host.mem.read(addr, ln))
                elif typ == BLK_T_GET_ID:
                    idb = b"minihost-blk".ljust(ln, b"\0")[:ln]
                    self.host.mem.write(addr, idb)
                    written += ln
                else:
                    status = BLK_S_UNSUPP
                off += ln
            if typ not in (BLK_T_IN, BLK_T_OUT, BLK_T_FLUSH, BLK_T_GET_ID):
                status = BLK_S_UNSUPP
            self.host.mem.write(st_addr, bytes([status]))
            self.rings[0].push(head, written + 1)
            self.reqs += 1
            did = True
        if did:
            self.raise_irq()


class Net(Device):
    def __init__(self, host):
        cfg = bytes([0x52, 0x54, 0x00, 0x12, 0x34, 0x56]) + struct.pack("<HH", 1, 1)
        super().__init__(host, VIRTIO_NET, 2, F_VERSION_1 | NET_F_MAC, cfg)


class Host:
    def __init__(self, args):
        self.args = args
        self.conn = Conn(args.socket)
        self.ap = None
        self.mem = Mem()
        self.regs = {}
        self.devs = []
        self.events = []
        self.next_ring = 0x2000
        self.failures = 0
        self.serial = None
        if args.serial_log:
            self.serial = args.serial_log

    # -- device page ---------------------------------------------------
    def alloc_ring(self, num):
        sz = (vring_size(num) + LAYOUT["mic_vring_info"][0] + ALIGN - 1) & ~(ALIGN - 1)
        off = self.next_ring
        self.next_ring += sz
        return off

    def add_device(self, dev, db):
        pos = BOOT_SIZE
        while True:
            d = DP_OFF + pos
            t = struct.unpack_from("<b", self.ap, d + DESC["type"])[0]
            if t in (ABI["MIC_TYPE_END"], ABI["MIC_TYPE_REMOVED"]):
                break
            nvq, fl, cl = (self.ap[d + DESC[f]] for f in ("num_vq", "feature_len", "config_len"))
            pos += desc_total(nvq, fl, cl)
        rings = [self.alloc_ring(dev.num) for _ in range(dev.num_vq)]
        dev.write_desc(DP_OFF + pos, db, rings)
        self.devs.append(dev)
        return dev

    def build_page(self, bad_magic=False):
        ap = self.ap
        ap[DP_OFF : DP_OFF + DP_SIZE] = bytes(DP_SIZE)
        struct.pack_into("<I", ap, DP_OFF + BOOT["magic"], MIC_MAGIC ^ (1 if bad_magic else 0))
        struct.pack_into("<b", ap, DP_OFF + BOOT["h2c_config_db"], -1)
        ap[DP_OFF + BOOT["node_id"]] = 1

    def publish(self, off):
        self.reg_write(SPAD(ABI["MIC_DPLO_SPAD"]), off & 0xFFFFFFFF)
        self.reg_write(SPAD(ABI["MIC_DPHI_SPAD"]), off >> 32)
        self.sync()
        self.raise_vec(ABI["MIC_CTRL_VECTOR"])

    def reg_write(self, off, val):
        self.conn.send(REG_WRITE, struct.pack("<II", off, val))

    def raise_vec(self, v):
        self.conn.send(RAISE_VECTOR, struct.pack("<I", v))

    def sync(self):
        self.conn.send(SYNC, struct.pack("<Q", 1))

    def h2c_config_db(self):
        return struct.unpack_from("<b", self.ap, DP_OFF + BOOT["h2c_config_db"])[0]

    # -- messages --------------------------------------------------------
    def handle(self, mtype, p):
        if mtype == HELLO:
            ver, node, apsize = struct.unpack_from("<IIQ", p)
            fd = self.conn.fds.pop(0)
            self.ap = mmap.mmap(fd, apsize, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
            os.close(fd)
            log("HELLO version 0x%x node %d aperture %d KiB" % (ver, node, apsize >> 10))
            self.conn.send(HELLO, struct.pack("<I", ABI["MIC_PROTO_VERSION"]))
            self.events.append(("hello",))
        elif mtype == MEM_TABLE:
            count = struct.unpack_from("<I", p)[0]
            regs = []
            for i in range(count):
                gpa, size, fo = struct.unpack_from("<QQQ", p, MEM_TABLE_HEAD + MEM_REGION_SIZE * i)
                fd = self.conn.fds.pop(0)
                m = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE, offset=fo)
                os.close(fd)
                regs.append((gpa, size, m))
            self.mem.set(regs)
            log("MEM_TABLE %s" % ", ".join("0x%x+0x%x" % (g, s) for g, s, _ in regs))
        elif mtype == REG_WRITE:
            off, val = struct.unpack_from("<II", p)
            self.regs[off] = val
            log("REG_WRITE 0x%03x = %d" % (off, val))
            self.events.append(("reg", off, val))
        elif mtype == DOORBELL:
            db, val = struct.unpack_from("<II", p)
            for d in self.devs:
                if d.c2h_db == db and not d.removed:
                    if val == ABI["MIC_DB_CONTROL"]:
                        d.control()
                    elif val <= ABI["MIC_DB_KICK_MAX"]:
                        d.kick(val)
                    break
            else:
                log("DOORBELL %d value 0x%x for no device" % (db, val))
        elif mtype == CARD_EVENT:
            ev = struct.unpack_from("<I", p)[0]
            log("CARD_EVENT %d" % ev)
            self.events.append(("card_event", ev))
        elif mtype == ERROR:
            log("ERROR %r" % (p,))
            self.fail("device reported an error")

    def pump(self, timeout):
        r, _, _ = select.select([self.conn.sock], [], [], timeout)
        if r:
            self.conn.fill()
            for m in self.conn.messages():
                self.handle(*m)

    def wait_for(self, what, pred, timeout):
        deadline = time.time() + timeout
        while time.time() < deadline:
            if pred():
                log("ok: " + what)
                return True
            self.pump(0.05)
        self.fail("timeout: " + what)
        return False

    def fail(self, msg):
        log("FAIL " + msg)
        self.failures += 1

    def serial_has(self, text):
        if not self.serial:
            return True
        try:
            with open(self.serial, "rb") as f:
                return text.encode() in f.read()
        except OSError:
            return False

    # -- scenario --------------------------------------------------------
    def run(self):
        a = self.args
        self.wait_for("HELLO", lambda: self.ap is not None, 30)
        if a.bad_page:
            self.bad_pages()
        if a.bad_page:
            # keep the bootparam (the card has set h2c_config_db); new descriptors
            self.ap[DP_OFF + BOOT_SIZE : DP_OFF + DP_SIZE] = bytes(DP_SIZE - BOOT_SIZE)
        else:
            self.build_page()
        con = self.add_device(Console(self), 0)
        blk = self.add_device(Blk(self), 1)
        net = self.add_device(Net(self), 2)
        if a.bad_page:
            self.raise_vec(0)
        else:
            self.publish(DP_OFF)
        self.wait_for("card online (CARD_STATE=2)", lambda: self.regs.get(CARD_STATE) == ABI["MIC_STATE_ONLINE"], 60)
        self.wait_for("h2c_config_db set", lambda: self.h2c_config_db() >= 0, 5)
        self.wait_for("console DRIVER_OK", lambda: con.started, 30)
        self.wait_for("block DRIVER_OK", lambda: blk.started, 30)
        self.wait_for("net DRIVER_OK", lambda: net.started, 30)
        if not con.acked() & F_VERSION_1:
            self.fail("console did not ack VERSION_1")
        self.wait_for("card reports online on serial", lambda: self.serial_has("mic-card: online"), 60)
        # shell round trip over the virtio console; the shell on hvc0 may
        # start after the online marker, and input before it is lost: retype
        last = [0.0]

        def answered():
            if b"VOP-42-OK" in con.out:
                return True
            if time.time() - last[0] > 3:
                con.type_in("\necho VOP-$((6*7))-OK\n")
                last[0] = time.time()
            return False

        self.wait_for("shell over hvc0", answered, 60)
        # block I/O: write a pattern through the card, read it back here
        con.type_in("echo minihost-pattern | dd of=/dev/vda bs=512 seek=7 conv=sync 2>/dev/null; sync; echo BLK-$((1+1))-DONE\n")
        self.wait_for("block write", lambda: b"BLK-2-DONE" in con.out, 30)
        if blk.disk[7 * 512 : 7 * 512 + 16] != b"minihost-pattern":
            self.fail("block data not on the disk: %r" % bytes(blk.disk[7 * 512 : 7 * 512 + 16]))
        else:
            log("ok: block data on the disk")
        con.type_in("ip -o addr show; cat /sys/class/net/eth0/address\n")
        self.wait_for("net configured", lambda: b"172.31.1.1/24" in con.out and b"52:54:00:12:34:56" in con.out, 15)
        # tools the tests use
        con.type_in("dd if=/dev/vda bs=512 count=8 2>/dev/null | sha256sum\n")
        want = hashlib.sha256(bytes(blk.disk[: 8 * 512])).hexdigest().encode()
        self.wait_for("sha256sum of the disk matches", lambda: want in con.out, 15)
        # config change on the net device
        c = net.ctrl()
        net.wr8(c + CTRL["guest_ack"], 0)
        net.wr8(c + CTRL["config_change"], ABI["MIC_VIRTIO_PARAM_CONFIG_CHANGED"])
        self.raise_vec(self.h2c_config_db())
        self.wait_for("config change acked", lambda: net.rd8(c + CTRL["guest_ack"]) == 1, 10)
        net.wr8(c + CTRL["config_change"], 0)
        net.wr8(c + CTRL["guest_ack"], 0)
        # hot removal of the block device
        c = blk.ctrl()
        blk.wr8(c + CTRL["config_change"], ABI["MIC_VIRTIO_PARAM_DEV_REMOVE"])
        self.raise_vec(self.h2c_config_db())
        self.wait_for("removal acked", lambda: blk.rd8(c + CTRL["guest_ack"]) == 1, 20)
        if blk.h2c() != -1:
            self.fail("h2c_vdev_db not freed on removal")
        blk.wr8(c + CTRL["config_change"], 0)
        blk.wr8(c + CTRL["guest_ack"], 0)
        blk.removed = True
        struct.pack_into("<b", self.ap, blk.pos + DESC["type"], ABI["MIC_TYPE_REMOVED"])
        self.wait_for("card saw the block device go", lambda: self.serial_has("mic-card: block removed vda"), 20)
        # hot add of a new block device into the freed slot
        blk2 = Blk(self, sectors=4096)
        rings = [self.alloc_ring(blk2.num)]
        blk2.write_desc(blk.pos, 3, rings)
        self.devs.append(blk2)
        self.raise_vec(self.h2c_config_db())
        self.wait_for("hot-added block DRIVER_OK", lambda: blk2.started, 30)
        con.type_in("cat /sys/block/vda/size\n")
        self.wait_for("hot-added block size", lambda: b"\n4096" in con.out, 15)
        if a.reload:
            # unload and reload the driver on the card (from a detached shell:
            # the console itself goes away with the driver)
            con.type_in("setsid sh -c 'sleep 1; rmmod mic_x100_vop; sleep 1; "
                        "insmod /lib/modules/$(uname -r)/extra/mic_x100_vop.ko' </dev/null >/dev/null 2>&1 &\n")
            self.wait_for("driver unloaded", lambda: self.h2c_config_db() == -1, 60)
            for d in (con, net, blk2):
                d.started = False
            self.wait_for("console back after reload", lambda: con.started, 60)
            self.wait_for("block back after reload", lambda: blk2.started, 60)
            self.wait_for("net back after reload", lambda: net.started, 60)
            con.out = b""
            con.type_in("\necho RELOAD-$((7*6))-OK\n")
            self.wait_for("shell over hvc0 after reload", lambda: b"RELOAD-42-OK" in con.out, 60)
        if a.no_shutdown:
            return
        if a.end == "panic":
            con.type_in("echo c > /proc/sysrq-trigger\n")
            self.wait_for("shutdown status crashed", lambda: self.regs.get(SHUTDOWN_STATUS) == ABI["MIC_STATUS_CRASHED"], 60)
            self.wait_for("card state shutting down", lambda: self.regs.get(CARD_STATE) == ABI["MIC_STATE_SHUTTING_DOWN"], 5)
            return
        if a.end == "reboot":
            con.type_in("reboot\n")
            self.wait_for("shutdown status restart", lambda: self.regs.get(SHUTDOWN_STATUS) == ABI["MIC_STATUS_RESTART"], 60)
            self.wait_for("card state shutting down", lambda: self.regs.get(CARD_STATE) == ABI["MIC_STATE_SHUTTING_DOWN"], 5)
            # RESET, or POWEROFF when QEMU runs with -no-reboot
            self.wait_for("RESET or POWEROFF event", lambda: ("card_event", ABI["MIC_CARD_EVENT_RESET"]) in self.events
                          or ("card_event", ABI["MIC_CARD_EVENT_POWEROFF"]) in self.events, 60)
            return
        # host-requested shutdown
        self.reg_write(HOST_REQUEST, ABI["MIC_HOST_REQ_SHUTDOWN"])
        self.sync()
        self.raise_vec(ABI["MIC_CTRL_VECTOR"])
        self.wait_for("shutdown status poweroff", lambda: self.regs.get(SHUTDOWN_STATUS) == ABI["MIC_STATUS_POWER_OFF"], 60)
        self.wait_for("card state shutting down", lambda: self.regs.get(CARD_STATE) == ABI["MIC_STATE_SHUTTING_DOWN"], 5)
        self.wait_for("host request taken", lambda: self.regs.get(HOST_REQUEST) == ABI["MIC_HOST_REQ_NONE"], 5)
        self.wait_for("POWEROFF event", lambda: ("card_event", ABI["MIC_CARD_EVENT_POWEROFF"]) in self.events, 60)

    def bad_pages(self):
        """malformed device pages: the card must log and skip, never crash"""
        self.wait_for("driver waits for the page",
                      lambda: self.serial_has("waiting for the host to publish the device page"), 120)
        p = DP_OFF + BOOT_SIZE
        # 1. wrong magic
        self.build_page(bad_magic=True)
        self.publish(DP_OFF)
        self.wait_for("bad magic refused", lambda: self.serial_has("has magic 0xc0ffee01"), 20)
        # 2. right magic, a descriptor that runs past the page
        self.build_page()
        struct.pack_into("<bBBB", self.ap, p, 3, 200, 255, 255)
        self.raise_vec(0)
        self.wait_for("descriptor past the page skipped", lambda: self.serial_has("runs past the device page"), 20)
        # 3. a descriptor over the limits (fits in the page), then one with a
        #    bad doorbell, then one whose ring magic is wrong
        self.ap[p : p + 8] = bytes(8)
        struct.pack_into("<bBBB", self.ap, p, 1, 99, 8, 10)
        bad = Console(self)
        pos2 = p + desc_total(99, 8, 10)
        bad.write_desc(pos2, 99, [self.alloc_ring(bad.num) for _ in range(2)])
        pos3 = pos2 + bad.total()
        badring = Console(self)
        badring.write_desc(pos3, 5, [self.alloc_ring(badring.num) for _ in range(2)])
        struct.pack_into("<I", self.ap, badring.rings[1].off + vring_size(badring.num) + VRING_INFO["magic"], 0x12345678)
        self.devs.append(badring)
        self.raise_vec(0)
        self.wait_for("descriptor over the limits skipped", lambda: self.serial_has("breaks the limits"), 20)
        self.wait_for("bad doorbell skipped", lambda: self.serial_has("c2h_vdev_db 99 out of range"), 20)
        self.wait_for("bad ring magic refused", lambda: self.serial_has("ring magic 0x12345678"), 30)
        # 4. the host takes the broken device away without waiting: the card
        #    must drop it without touching the slot
        badring.removed = True
        struct.pack_into("<b", self.ap, pos3 + DESC["type"], ABI["MIC_TYPE_REMOVED"])
        self.raise_vec(0)
        self.wait_for("stale device dropped", lambda: self.serial_has("(descriptor gone)"), 20)
        self.pump_for(1)

    def pump_for(self, secs):
        end = time.time() + secs
        while time.time() < end:
            self.pump(0.05)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("socket", help="the mic-x100 chardev socket (QEMU listening)")
    ap.add_argument("--serial-log", help="file QEMU writes the card's serial port to")
    ap.add_argument("--bad-page", action="store_true", help="first publish malformed pages")
    ap.add_argument("--no-shutdown", action="store_true")
    ap.add_argument("--reload", action="store_true", help="rmmod/insmod the card driver midway")
    ap.add_argument("--end", choices=("shutdown", "panic", "reboot"), default="shutdown",
                    help="how the card stops: host request, panic on the card, reboot on the card")
    ap.add_argument("--console-log", help="write what the card printed on hvc0 here")
    args = ap.parse_args()
    h = Host(args)
    try:
        h.run()
    except EOFError as e:
        if not ("card_event", 2) in h.events:
            h.fail(str(e))
    finally:
        if args.console_log:
            con = [d for d in h.devs if isinstance(d, Console)]
            if con:
                with open(args.console_log, "wb") as f:
                    f.write(con[0].out)
    if h.failures:
        log("FAIL (%d failures)" % h.failures)
        return 1
    log("PASS")
    return 0


if __name__ == "__main__":
    sys.exit(main())
