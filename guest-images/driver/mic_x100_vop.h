/* SPDX-License-Identifier: (GPL-2.0 WITH Linux-syscall-note) OR MIT */
/*
 * The VOP ABI of the emulated Intel MIC X100 card and the protocol between
 * the mic-x100 QEMU device and its host side, as one uapi-style header.
 *
 * This file is the code's single definition of both:
 *   docs/vop-abi.md         registers, scratchpads, doorbells, vectors, the
 *                           device page, limits, card states and statuses;
 *   docs/device-protocol.md the socket protocol's messages and payloads.
 * Users: the card driver (guest-images/driver/), the QEMU device (copied
 * beside it as hw/misc/mic_x100_vop.h by scripts/build-qemu), the test host
 * guest-images/tools/vop-minihost.py (reads the #defines) and vop-bridge,
 * whose Rust mirrors (src/abi.rs, src/device_protocol.rs) are checked
 * against this file by vop-bridge/tests/abi_header.rs.
 *
 * Rules that keep it readable by all of them: only fixed-width
 * little-endian types, packed structs with static size asserts, object-like
 * #defines with plain integer values (or expressions of earlier ones), no
 * kernel-only includes.  Virtio's own constants and the split ring layout
 * are not restated here: they come from <linux/virtio_*.h>.
 */
#ifndef MIC_X100_VOP_H
#define MIC_X100_VOP_H

/*
 * Portability shim.  The kernel and every Linux user space (the QEMU device
 * only builds on Linux) have <linux/types.h> with __u8 .. __le64; anything
 * else gets the same names from <stdint.h>.
 */
#if defined(__KERNEL__) || defined(__linux__)
#include <linux/types.h>
#else
#include <stdint.h>
typedef uint8_t __u8;
typedef int8_t __s8;
typedef uint16_t __le16;
typedef uint32_t __le32;
typedef uint64_t __le64;
#endif

#define MIC_PACKED __attribute__((packed))
#ifdef __cplusplus
#define MIC_STATIC_ASSERT(expr) static_assert(expr, #expr)
#else
#define MIC_STATIC_ASSERT(expr) _Static_assert(expr, #expr)
#endif

/* ---- PCI function (docs/vop-abi.md section 1) ---- */

#define MIC_X100_PCI_VENDOR		0x8086
#define MIC_X100_PCI_DEVICE_2250	0x2250	/* upstream MIC_X100_PCI_DEVICE_2250 */
#define MIC_X100_PCI_CLASS		0x0b40	/* co-processor */

#define MIC_BAR_REGS		0
#define MIC_BAR_APERTURE	2
#define MIC_BAR_MSIX		4
#define MIC_REGS_SIZE		0x1000

/* ---- BAR0 registers, 32-bit (docs/vop-abi.md section 2) ---- */

#define MIC_REG_MAGIC		0x000
#define MIC_REG_ABI_VERSION	0x004
#define MIC_REG_FAMILY		0x008
#define MIC_REG_STEPPING	0x00c
#define MIC_REG_NODE_ID		0x010
#define MIC_REG_NUM_SPADS	0x014
#define MIC_REG_NUM_DOORBELLS	0x018
#define MIC_REG_NUM_VECTORS	0x01c
#define MIC_REG_APERTURE_LO	0x020
#define MIC_REG_APERTURE_HI	0x024
#define MIC_REG_CARD_STATE	0x040
#define MIC_REG_SHUTDOWN_STATUS	0x044
#define MIC_REG_HOST_REQUEST	0x048
#define MIC_REG_SPAD_BASE	0x100
#define MIC_REG_DOORBELL_BASE	0x200
#define MIC_REG_SPAD(i)		(MIC_REG_SPAD_BASE + 4 * (i))
#define MIC_REG_DOORBELL(n)	(MIC_REG_DOORBELL_BASE + 4 * (n))

#define MIC_REGS_MAGIC		0x5843494d	/* "MICX" */
#define MIC_ABI_VERSION_MAJOR	1
#define MIC_ABI_VERSION_MINOR	2	/* 1: the heartbeat block (5.6); 2: a vector per queue (5.7) */
#define MIC_ABI_VERSION		((MIC_ABI_VERSION_MAJOR << 16) | MIC_ABI_VERSION_MINOR)
#define MIC_FAMILY_X100		100

/* the parts of an ABI_VERSION or a protocol version */
#define MIC_VERSION_MAJOR(v)	((v) >> 16)
#define MIC_VERSION_MINOR(v)	((v) & 0xffff)

/* STEPPING, also the PCI revision */
#define MIC_STEPPING_A0		0x00
#define MIC_STEPPING_B0		0x10
#define MIC_STEPPING_B1		0x11
#define MIC_STEPPING_C0		0x20

#define MIC_NUM_SPADS		16
#define MIC_NUM_DOORBELLS	32
#define MIC_NUM_VECTORS		32

/* scratchpads holding the device page offset (upstream names) */
#define MIC_DPLO_SPAD		14
#define MIC_DPHI_SPAD		15

/* ---- interrupts and doorbells (docs/vop-abi.md sections 3 and 4) ---- */

/* MSI-X vector 0: control (page published, HOST_REQUEST, h2c_config_db) */
#define MIC_CTRL_VECTOR		0

/* values written to a card-to-host doorbell */
#define MIC_DB_KICK_MAX		0x0000ffff	/* kick: the queue index */
#define MIC_DB_CONTROL		0x80000000

/* HOST_REQUEST */
#define MIC_HOST_REQ_NONE	0
#define MIC_HOST_REQ_SHUTDOWN	1

/* ---- card lifecycle (docs/vop-abi.md section 6) ---- */

/* card states (CARD_STATE), upstream MIC_READY .. MIC_RESET_FAILED */
#define MIC_STATE_READY		0
#define MIC_STATE_BOOTING	1
#define MIC_STATE_ONLINE	2
#define MIC_STATE_SHUTTING_DOWN	3
#define MIC_STATE_RESETTING	4
#define MIC_STATE_RESET_FAILED	5

/* shutdown status (SHUTDOWN_STATUS), upstream MIC_NOP .. MIC_RESTART */
#define MIC_STATUS_NOP		0
#define MIC_STATUS_CRASHED	1
#define MIC_STATUS_HALTED	2
#define MIC_STATUS_POWER_OFF	3
#define MIC_STATUS_RESTART	4

/* ---- the device page (docs/vop-abi.md section 5) ---- */

#define MIC_MAGIC		0xc0ffee00
#define MIC_DP_SIZE		4096
#define MIC_DP_DEFAULT_OFFSET	0x1000	/* where our hosts place it */
#define MIC_VIRTIO_RING_ALIGN	4096

/* mic_device_desc.type values that are not virtio device ids */
#define MIC_TYPE_END		0
#define MIC_TYPE_REMOVED	(-1)

/* mic_device_ctrl.config_change */
#define MIC_VIRTIO_PARAM_DEV_REMOVE	1
#define MIC_VIRTIO_PARAM_CONFIG_CHANGED	2

/* limits (docs/vop-abi.md section 5.4) */
#define MIC_MAX_VQS		16
#define MIC_MAX_VRING_ENTRIES	1024
#define MIC_MAX_DESC_SIZE	1024
#define MIC_MIN_FEATURE_LEN	1
#define MIC_MAX_FEATURE_LEN	32
#define MIC_HOST_FEATURE_LEN	8	/* what our hosts write */

/* 5.1: at offset 0 of the page */
struct mic_bootparam {
	__le32 magic;
	__s8 h2c_config_db;
	__u8 node_id;
	__u8 h2c_scif_db;
	__u8 c2h_scif_db;
	__le64 scif_host_dma_addr;
	__le64 scif_card_dma_addr;
} MIC_PACKED;

/* 5.2: head of a device descriptor; the variable part follows */
struct mic_device_desc {
	__s8 type;
	__u8 num_vq;
	__u8 feature_len;
	__u8 config_len;
	__u8 status;
	__u8 pad[3];
	__le64 config[];
} MIC_PACKED;

/* 5.2: one per virtqueue, first in the variable part */
struct mic_vqconfig {
	__le64 address;
	__le64 used_address;
	__le16 num;
	__s8 h2c_vq_db;		/* 5.7: the queue's own vector (ABI 1.2) */
	__u8 pad[5];
} MIC_PACKED;

/* 5.2: last in a descriptor */
struct mic_device_ctrl {
	__le64 vdev;
	__u8 config_change;
	__u8 vdev_reset;
	__u8 guest_ack;
	__u8 host_ack;
	__u8 used_address_updated;
	__s8 c2h_vdev_db;
	__s8 h2c_vdev_db;
	__u8 pad;
} MIC_PACKED;

/* 5.3: after each ring, at vring_size(num, MIC_VIRTIO_RING_ALIGN) */
struct mic_vring_info {
	__le16 avail_idx;
	__u8 pad[2];
	__le32 magic;
} MIC_PACKED;

/*
 * 5.6 (ABI 1.1): the heartbeat block, the last 16 bytes of the device page.
 * The host zeroes it and writes MIC_HEARTBEAT_MAGIC into it when it builds
 * the page, and keeps its descriptors before it.  A card that finds the
 * magic writes its beat period, then a new count every period.  Cards and
 * hosts of ABI 1.0 neither write nor read it.  The magic's low byte is 0, so
 * a descriptor scan that reaches the block sees the end of the list.
 */
#define MIC_HEARTBEAT_OFFSET	(MIC_DP_SIZE - 16)
#define MIC_HEARTBEAT_MAGIC	0x54424800	/* "\0HBT" */

struct mic_heartbeat {
	__le32 magic;		/* host: MIC_HEARTBEAT_MAGIC */
	__le32 period_ms;	/* card: its beat period */
	__le32 count;		/* card: beats so far; 0 = none yet */
	__le32 pad;
} MIC_PACKED;

MIC_STATIC_ASSERT(sizeof(struct mic_bootparam) == 24);
MIC_STATIC_ASSERT(sizeof(struct mic_device_desc) == 8);
MIC_STATIC_ASSERT(sizeof(struct mic_vqconfig) == 24);
MIC_STATIC_ASSERT(sizeof(struct mic_device_ctrl) == 16);
MIC_STATIC_ASSERT(sizeof(struct mic_vring_info) == 8);
MIC_STATIC_ASSERT(sizeof(struct mic_heartbeat) == 16);

/* bytes of a descriptor before its control block (upstream mic_desc_size) */
static inline unsigned int mic_desc_size(unsigned int num_vq,
					 unsigned int feature_len,
					 unsigned int config_len)
{
	return (unsigned int)(sizeof(struct mic_device_desc) +
			      num_vq * sizeof(struct mic_vqconfig) +
			      feature_len * 2 + config_len + 7) & ~7u;
}

/* bytes from a descriptor to the next one (upstream mic_total_desc_size) */
static inline unsigned int mic_total_desc_size(unsigned int num_vq,
					       unsigned int feature_len,
					       unsigned int config_len)
{
	return mic_desc_size(num_vq, feature_len, config_len) +
	       (unsigned int)sizeof(struct mic_device_ctrl);
}

/* ---- device protocol (docs/device-protocol.md) ---- */

#define MIC_PROTO_VERSION_MAJOR	1
#define MIC_PROTO_VERSION_MINOR	0
#define MIC_PROTO_VERSION	((MIC_PROTO_VERSION_MAJOR << 16) | MIC_PROTO_VERSION_MINOR)

/* section 2: framing */
#define MIC_MSG_MAX_PAYLOAD	4096
#define MIC_MSG_MAX_FDS		16

/* message types, sections 3 and 4 */
#define MIC_MSG_HELLO		1	/* both directions */
#define MIC_MSG_MEM_TABLE	2	/* device to host */
#define MIC_MSG_REG_WRITE	3	/* both directions */
#define MIC_MSG_DOORBELL	4	/* device to host */
#define MIC_MSG_CARD_EVENT	5	/* device to host */
#define MIC_MSG_SET_DOORBELL_FD	6	/* host to device */
#define MIC_MSG_SET_VECTOR_FD	7	/* host to device */
#define MIC_MSG_RAISE_VECTOR	8	/* host to device */
#define MIC_MSG_SYNC		10	/* both directions */
#define MIC_MSG_ERROR		11	/* device to host */

/* mic_msg_card_event.event */
#define MIC_CARD_EVENT_RESET	1
#define MIC_CARD_EVENT_POWEROFF	2
#define MIC_CARD_EVENT_RUN	3
#define MIC_CARD_EVENT_STOP	4

/* mic_msg_device_hello.flags */
#define MIC_HELLO_FLAG_RUNNING	0x1

#define MIC_MAX_MEM_REGIONS	16
#define MIC_ERROR_TEXT_MAX	256

/* every message starts with this header; size payload bytes follow */
struct mic_msg_hdr {
	__le32 type;
	__le32 size;
} MIC_PACKED;

/* HELLO from the device, with the aperture fd */
struct mic_msg_device_hello {
	__le32 version;
	__le32 node_id;
	__le64 aperture_size;
	__le32 num_spads;
	__le32 num_doorbells;
	__le32 num_vectors;
	__le32 flags;
	__le32 card_state;
	__le32 shutdown_status;
	__le32 host_request;
	__le32 pad;
	__le32 spads[MIC_NUM_SPADS];
} MIC_PACKED;

/* HELLO from the host side */
struct mic_msg_host_hello {
	__le32 version;
} MIC_PACKED;

/* one MEM_TABLE region; its fd travels with the message, in order */
struct mic_msg_mem_region {
	__le64 gpa;
	__le64 size;
	__le64 fd_offset;
} MIC_PACKED;

/* MEM_TABLE */
struct mic_msg_mem_table {
	__le32 count;
	__le32 pad;
	struct mic_msg_mem_region regions[];
} MIC_PACKED;

/* REG_WRITE, both directions */
struct mic_msg_reg_write {
	__le32 offset;
	__le32 value;
} MIC_PACKED;

/* DOORBELL */
struct mic_msg_doorbell {
	__le32 doorbell;
	__le32 value;
} MIC_PACKED;

/* CARD_EVENT */
struct mic_msg_card_event {
	__le32 event;
} MIC_PACKED;

/* SET_DOORBELL_FD, with 0 or 1 fd */
struct mic_msg_set_doorbell_fd {
	__le32 doorbell;
	__le32 value;
} MIC_PACKED;

/* SET_VECTOR_FD, with 0 or 1 fd */
struct mic_msg_set_vector_fd {
	__le32 vector;
	__le32 pad;
} MIC_PACKED;

/* RAISE_VECTOR */
struct mic_msg_raise_vector {
	__le32 vector;
} MIC_PACKED;

/* SYNC, both directions */
struct mic_msg_sync {
	__le64 token;
} MIC_PACKED;

/* ERROR: up to MIC_ERROR_TEXT_MAX bytes of UTF-8 text follow */
struct mic_msg_error {
	__le32 request_type;
	__le32 error;		/* positive errno */
	char text[];
} MIC_PACKED;

MIC_STATIC_ASSERT(sizeof(struct mic_msg_hdr) == 8);
MIC_STATIC_ASSERT(sizeof(struct mic_msg_device_hello) == 112);
MIC_STATIC_ASSERT(sizeof(struct mic_msg_host_hello) == 4);
MIC_STATIC_ASSERT(sizeof(struct mic_msg_mem_region) == 24);
MIC_STATIC_ASSERT(sizeof(struct mic_msg_mem_table) == 8);
MIC_STATIC_ASSERT(sizeof(struct mic_msg_reg_write) == 8);
MIC_STATIC_ASSERT(sizeof(struct mic_msg_doorbell) == 8);
MIC_STATIC_ASSERT(sizeof(struct mic_msg_card_event) == 4);
MIC_STATIC_ASSERT(sizeof(struct mic_msg_set_doorbell_fd) == 8);
MIC_STATIC_ASSERT(sizeof(struct mic_msg_set_vector_fd) == 8);
MIC_STATIC_ASSERT(sizeof(struct mic_msg_raise_vector) == 4);
MIC_STATIC_ASSERT(sizeof(struct mic_msg_sync) == 8);
MIC_STATIC_ASSERT(sizeof(struct mic_msg_error) == 8);

#endif /* MIC_X100_VOP_H */
