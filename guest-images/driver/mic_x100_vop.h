/* SPDX-License-Identifier: GPL-2.0 */
/*
 * Card side of the emulated Intel MIC X100 virtio-over-PCIe (VOP) transport.
 * Register map, device page layout and protocol: docs/vop-abi.md.
 */
#ifndef MIC_X100_VOP_H
#define MIC_X100_VOP_H

#include <linux/types.h>
#include <linux/build_bug.h>

#define MIC_X100_PCI_VENDOR		0x8086
#define MIC_X100_PCI_DEVICE_2250	0x2250

/* BAR numbers */
#define MIC_BAR_REGS		0
#define MIC_BAR_APERTURE	2

/* BAR0 registers (32-bit) */
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
#define MIC_REG_SPAD(i)		(0x100 + 4 * (i))
#define MIC_REG_DOORBELL(n)	(0x200 + 4 * (n))
#define MIC_REGS_SIZE		0x1000

#define MIC_REGS_MAGIC		0x5843494d	/* "MICX" */
#define MIC_ABI_MAJOR		1
#define MIC_MAX_SPADS		16
#define MIC_MAX_DOORBELLS	32
#define MIC_MAX_VECTORS		32

#define MIC_DPLO_SPAD		14
#define MIC_DPHI_SPAD		15

/* MSI-X vector 0: control (page published, HOST_REQUEST, h2c_config_db) */
#define MIC_CTRL_VECTOR		0

/* values written to a card-to-host doorbell */
#define MIC_DB_KICK_MAX		0x0000ffff	/* kick: the queue index */
#define MIC_DB_CONTROL		0x80000000

/* HOST_REQUEST */
#define MIC_HOST_REQ_NONE	0
#define MIC_HOST_REQ_SHUTDOWN	1

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

/* device page */
#define MIC_MAGIC		0xc0ffee00
#define MIC_DP_SIZE		4096
#define MIC_VIRTIO_RING_ALIGN	4096

#define MIC_VIRTIO_PARAM_DEV_REMOVE	1
#define MIC_VIRTIO_PARAM_CONFIG_CHANGED	2

/* limits (docs/vop-abi.md section 5.4) */
#define MIC_MAX_VQS		16
#define MIC_MAX_VRING_ENTRIES	1024
#define MIC_MAX_DESC_SIZE	1024
#define MIC_MIN_FEATURE_LEN	1
#define MIC_MAX_FEATURE_LEN	32

struct mic_bootparam {
	__le32 magic;
	__s8 h2c_config_db;
	__u8 node_id;
	__u8 h2c_scif_db;
	__u8 c2h_scif_db;
	__le64 scif_host_dma_addr;
	__le64 scif_card_dma_addr;
} __packed;

struct mic_device_desc {
	__s8 type;
	__u8 num_vq;
	__u8 feature_len;
	__u8 config_len;
	__u8 status;
	__u8 pad[3];
	__le64 config[];
} __packed;

struct mic_vqconfig {
	__le64 address;
	__le64 used_address;
	__le16 num;
	__u8 pad[6];
} __packed;

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
} __packed;

struct mic_vring_info {
	__le16 avail_idx;
	__u8 pad[2];
	__le32 magic;
} __packed;

static_assert(sizeof(struct mic_bootparam) == 24);
static_assert(sizeof(struct mic_device_desc) == 8);
static_assert(sizeof(struct mic_vqconfig) == 24);
static_assert(sizeof(struct mic_device_ctrl) == 16);
static_assert(sizeof(struct mic_vring_info) == 8);

/* bytes of a descriptor before its control block */
static inline unsigned int mic_desc_size(unsigned int num_vq,
					 unsigned int feature_len,
					 unsigned int config_len)
{
	return ALIGN(sizeof(struct mic_device_desc) +
		     num_vq * sizeof(struct mic_vqconfig) +
		     feature_len * 2 + config_len, 8);
}

/* bytes from a descriptor to the next one */
static inline unsigned int mic_total_desc_size(unsigned int num_vq,
					       unsigned int feature_len,
					       unsigned int config_len)
{
	return mic_desc_size(num_vq, feature_len, config_len) +
	       sizeof(struct mic_device_ctrl);
}

#endif /* MIC_X100_VOP_H */
