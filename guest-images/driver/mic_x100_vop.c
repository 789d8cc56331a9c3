// SPDX-License-Identifier: GPL-2.0
/*
 * Card side of the virtio-over-PCIe (VOP) transport of the emulated Intel
 * MIC X100 coprocessor.
 *
 * The host serves virtio devices to the card through a 4 KiB device page in
 * the aperture BAR (BAR2). The page lists one descriptor per device: its
 * features, config space, a control block and, per virtqueue, the aperture
 * offset of a split ring the host allocated. This driver registers each
 * descriptor as a virtio device, builds the virtqueues on the rings in the
 * aperture, kicks the host through the card-to-host doorbell registers in
 * BAR0 and takes host-to-card doorbells as MSI-X vectors.
 *
 * The register map, the device page layout and the protocol are specified
 * in docs/vop-abi.md; the structure of this driver follows virtio_mmio.c.
 */

#define pr_fmt(fmt) KBUILD_MODNAME ": " fmt

#include <linux/bitmap.h>
#include <linux/delay.h>
#include <linux/interrupt.h>
#include <linux/io.h>
#include <linux/jiffies.h>
#include <linux/kernel.h>
#include <linux/list.h>
#include <linux/module.h>
#include <linux/mutex.h>
#include <linux/notifier.h>
#include <linux/panic_notifier.h>
#include <linux/pci.h>
#include <linux/reboot.h>
#include <linux/slab.h>
#include <linux/spinlock.h>
#include <linux/version.h>
#include <linux/virtio.h>
#include <linux/virtio_config.h>
#include <linux/virtio_ring.h>
#include <linux/workqueue.h>
#include <uapi/linux/virtio_config.h>

#include "mic_x100_vop.h"

#define DRV_NAME KBUILD_MODNAME

static unsigned int poll_ms = 1000;
module_param(poll_ms, uint, 0644);
MODULE_PARM_DESC(poll_ms,
		 "while no device page is published, also look for one every poll_ms milliseconds (0: only on the control vector)");

static unsigned int reset_timeout_ms = 10000;
module_param(reset_timeout_ms, uint, 0644);
MODULE_PARM_DESC(reset_timeout_ms,
		 "how long a device reset waits for the host's host_ack");

static bool queue_vectors = true;
module_param(queue_vectors, bool, 0644);
MODULE_PARM_DESC(queue_vectors,
		 "give each virtqueue its own MSI-X vector where the host offers it and vectors remain (docs/vop-abi.md 5.7)");

static unsigned int heartbeat_ms = 1000;
module_param(heartbeat_ms, uint, 0444);
MODULE_PARM_DESC(heartbeat_ms,
		 "beat period in milliseconds, when the host's device page has a heartbeat block (0: no heartbeat)");

struct vop_card;

/* one virtio device served by the host */
struct vop_vdev {
	struct virtio_device vdev;
	struct vop_card *card;
	struct list_head node;

	/* where the descriptor is, and its shape when it was registered */
	unsigned int desc_off;		/* offset in the device page */
	s8 type;
	u8 num_vq;
	u8 feature_len;
	u8 config_len;
	struct mic_device_desc *desc;
	struct mic_vqconfig *vqconfig;
	u8 *host_features;
	u8 *acked_features;
	u8 *config;
	struct mic_device_ctrl *ctrl;

	unsigned int c2h_db;		/* DOORBELL[c2h_db] */
	unsigned int vector;		/* MSI-X vector (h2c_vdev_db) */
	bool irq_requested;
	bool detached;			/* descriptor no longer ours: hands off */
	u8 shadow_status;		/* the status once detached */
	u64 cookie;			/* written to ctrl->vdev */
	char irq_name[32];

	unsigned int nvqs;
	struct virtqueue *vqs[MIC_MAX_VQS];
	/* a queue's own vector (h2c_vq_db), 0 while it shares vector */
	unsigned int vq_vector[MIC_MAX_VQS];
	char vq_irq_name[MIC_MAX_VQS][32];
};

struct vop_card {
	struct pci_dev *pdev;
	void __iomem *regs;
	void *aperture;			/* BAR2, write-back mapping */
	u64 aperture_size;
	unsigned int num_doorbells;
	unsigned int nvec;

	struct mutex lock;		/* page, devices, vectors */
	u64 page_off;			/* 0: no page accepted */
	void *page;			/* set under lock and beat_lock */
	u64 rejected_off;		/* last offset refused (log once) */
	struct list_head vdevs;
	DECLARE_BITMAP(vectors_used, MIC_NUM_VECTORS);
	u64 next_cookie;
	bool waiting_logged;
	bool stopping;

	struct workqueue_struct *wq;
	struct work_struct ctrl_work;
	struct delayed_work poll_work;

	struct notifier_block reboot_nb;
	struct notifier_block panic_nb;

	/*
	 * The heartbeat (docs/vop-abi.md 5.6).  Its own lock, held for a few
	 * stores, so that a control path waiting on the host does not hold
	 * the beat back: only a card that no longer runs its timers misses it.
	 */
	spinlock_t beat_lock;		/* page, for the beat */
	struct delayed_work beat_work;
	u32 beats;
};

#define to_vop_vdev(vd) container_of(vd, struct vop_vdev, vdev)

static inline u32 vop_rreg(struct vop_card *card, unsigned int off)
{
	return readl(card->regs + off);
}

static inline void vop_wreg(struct vop_card *card, unsigned int off, u32 val)
{
	writel(val, card->regs + off);
}

static inline struct device *vop_dev(struct vop_card *card)
{
	return &card->pdev->dev;
}

static void vop_ring_control(struct vop_vdev *vd)
{
	vop_wreg(vd->card, MIC_REG_DOORBELL(vd->c2h_db), MIC_DB_CONTROL);
}

/* ------------------------------------------------------------------ */
/* virtio_config_ops                                                    */

static u64 vop_get_features(struct virtio_device *vdev)
{
	struct vop_vdev *vd = to_vop_vdev(vdev);
	unsigned int i, n = min_t(unsigned int, vd->feature_len, 8);
	u64 features = 0;

	for (i = 0; i < n; i++)
		features |= (u64)READ_ONCE(vd->host_features[i]) << (8 * i);
	return features;
}

static int vop_finalize_features(struct virtio_device *vdev)
{
	struct vop_vdev *vd = to_vop_vdev(vdev);
	unsigned int i;

	/* Give virtio_ring a chance to accept features. */
	vring_transport_features(vdev);

	/* The rings are split rings in the aperture; nothing else is offered. */
	__virtio_clear_bit(vdev, VIRTIO_F_RING_PACKED);
	__virtio_clear_bit(vdev, VIRTIO_F_ACCESS_PLATFORM);
#ifdef VIRTIO_F_NOTIFICATION_DATA
	__virtio_clear_bit(vdev, VIRTIO_F_NOTIFICATION_DATA);
#endif
#ifdef VIRTIO_F_RING_RESET
	__virtio_clear_bit(vdev, VIRTIO_F_RING_RESET);
#endif

	if (!__virtio_test_bit(vdev, VIRTIO_F_VERSION_1))
		dev_warn_once(&vdev->dev,
			      "device does not offer VIRTIO_F_VERSION_1, using legacy semantics\n");

	for (i = 0; i < vd->feature_len; i++) {
		u8 byte = i < 8 ? (u8)(vdev->features >> (8 * i)) : 0;

		WRITE_ONCE(vd->acked_features[i], byte);
	}
	return 0;
}

static void vop_get(struct virtio_device *vdev, unsigned int offset,
		    void *buf, unsigned int len)
{
	struct vop_vdev *vd = to_vop_vdev(vdev);

	if (offset + len > vd->config_len || offset + len < offset) {
		dev_warn_ratelimited(&vdev->dev,
				     "config read %u+%u past config_len %u\n",
				     offset, len, vd->config_len);
		memset(buf, 0, len);
		return;
	}
	memcpy(buf, vd->config + offset, len);
}

static void vop_set(struct virtio_device *vdev, unsigned int offset,
		    const void *buf, unsigned int len)
{
	struct vop_vdev *vd = to_vop_vdev(vdev);

	if (offset + len > vd->config_len || offset + len < offset) {
		dev_warn_ratelimited(&vdev->dev,
				     "config write %u+%u past config_len %u\n",
				     offset, len, vd->config_len);
		return;
	}
	if (vd->detached)
		return;
	memcpy(vd->config + offset, buf, len);
	/* ring control after the bytes are in place (writel orders them) */
	vop_ring_control(vd);
}

static u8 vop_get_status(struct virtio_device *vdev)
{
	struct vop_vdev *vd = to_vop_vdev(vdev);

	if (vd->detached)
		return vd->shadow_status;
	return READ_ONCE(vd->desc->status);
}

static void vop_set_status(struct virtio_device *vdev, u8 status)
{
	struct vop_vdev *vd = to_vop_vdev(vdev);

	/* We should never be setting status to 0. */
	WARN_ON(status == 0);
	if (vd->detached) {
		vd->shadow_status = status;
		return;
	}
	WRITE_ONCE(vd->desc->status, status);
	vop_ring_control(vd);
}

/*
 * Card-initiated reset (docs/vop-abi.md 7.3): ask, then wait until the host
 * has stopped using the rings before the driver frees the buffers.
 */
static void vop_reset(struct virtio_device *vdev)
{
	struct vop_vdev *vd = to_vop_vdev(vdev);
	struct mic_device_ctrl *ctrl = vd->ctrl;
	unsigned long deadline;
	unsigned int timeout;

	if (vd->detached) {
		vd->shadow_status = 0;
		return;
	}
	WRITE_ONCE(ctrl->host_ack, 0);
	WRITE_ONCE(ctrl->vdev_reset, 1);
	vop_ring_control(vd);

	/*
	 * While the card goes down (devices are reset from device_shutdown())
	 * its memory is not reused before the host sees the power event, so
	 * a host that does not answer does not hold the shutdown for long.
	 */
	timeout = READ_ONCE(vd->card->stopping) ?
		  min(reset_timeout_ms, 1000U) : reset_timeout_ms;
	deadline = jiffies + msecs_to_jiffies(timeout);
	while (!READ_ONCE(ctrl->host_ack)) {
		if (time_after(jiffies, deadline)) {
			dev_warn(&vdev->dev,
				 "host did not acknowledge the reset within %u ms\n",
				 timeout);
			break;
		}
		usleep_range(500, 1000);
	}
	/* the host sets it too; make sure it is 0 if it timed out */
	WRITE_ONCE(vd->desc->status, 0);
}

static bool vop_notify(struct virtqueue *vq)
{
	struct vop_vdev *vd = to_vop_vdev(vq->vdev);

	if (unlikely(vd->detached))
		return false;
	/* kick: the queue index to this device's doorbell */
	vop_wreg(vd->card, MIC_REG_DOORBELL(vd->c2h_db), vq->index);
	return true;
}

/* the device's vector: every queue without a vector of its own */
static irqreturn_t vop_vdev_interrupt(int irq, void *opaque)
{
	struct vop_vdev *vd = opaque;
	unsigned int i;

	for (i = 0; i < vd->nvqs; i++)
		if (vd->vqs[i] && !vd->vq_vector[i])
			vring_interrupt(irq, vd->vqs[i]);
	return IRQ_HANDLED;
}

/* a queue's own vector */
static irqreturn_t vop_vq_interrupt(int irq, void *opaque)
{
	return vring_interrupt(irq, opaque);
}

static int vop_alloc_vector(struct vop_card *card);
static void vop_free_vector(struct vop_card *card, unsigned int v);

/*
 * Gives back the queues' own vectors (docs/vop-abi.md 5.7) and tells the
 * host that they share the device's again (-1: the offer stands).
 */
static void vop_put_queue_vectors(struct vop_vdev *vd)
{
	struct pci_dev *pdev = vd->card->pdev;
	unsigned int i;

	for (i = 0; i < vd->nvqs; i++) {
		if (!vd->vq_vector[i])
			continue;
		if (!vd->detached)
			WRITE_ONCE(vd->vqconfig[i].h2c_vq_db, -1);
		free_irq(pci_irq_vector(pdev, vd->vq_vector[i]), vd->vqs[i]);
		vop_free_vector(vd->card, vd->vq_vector[i]);
		vd->vq_vector[i] = 0;
	}
}

/*
 * A vector for each queue that has a callback, when the host offers it
 * (h2c_vq_db is -1 in every such queue: a 1.1 host leaves 0) and enough
 * vectors remain; otherwise every queue shares the device's vector, as
 * before ABI 1.2.  Runs before DRIVER_OK, when the host reads them.
 */
static void vop_get_queue_vectors(struct vop_vdev *vd)
{
	struct pci_dev *pdev = vd->card->pdev;
	unsigned int i, wanted = 0;
	int v, err;

	if (!queue_vectors)
		return;
	for (i = 0; i < vd->nvqs; i++) {
		if (!vd->vqs[i] || !vd->vqs[i]->callback)
			continue;
		if (READ_ONCE(vd->vqconfig[i].h2c_vq_db) != -1)
			return;
		wanted++;
	}
	if (wanted < 2)
		return;		/* one queue: the device's vector is its own */
	for (i = 0; i < vd->nvqs; i++) {
		if (!vd->vqs[i] || !vd->vqs[i]->callback)
			continue;
		v = vop_alloc_vector(vd->card);
		if (v < 0) {
			dev_info(&vd->vdev.dev,
				 "MSI-X vectors run short: queues share vector %u\n",
				 vd->vector);
			goto fallback;
		}
		snprintf(vd->vq_irq_name[i], sizeof(vd->vq_irq_name[i]),
			 "%s-vdev%u-q%u", DRV_NAME, vd->vdev.index, i);
		err = request_irq(pci_irq_vector(pdev, v), vop_vq_interrupt, 0,
				  vd->vq_irq_name[i], vd->vqs[i]);
		if (err) {
			vop_free_vector(vd->card, v);
			dev_warn(&vd->vdev.dev,
				 "cannot request vector %d: %d; queues share vector %u\n",
				 v, err, vd->vector);
			goto fallback;
		}
		vd->vq_vector[i] = v;
		WRITE_ONCE(vd->vqconfig[i].h2c_vq_db, v);
	}
	return;
fallback:
	vop_put_queue_vectors(vd);
}

static void vop_del_vqs(struct virtio_device *vdev)
{
	struct vop_vdev *vd = to_vop_vdev(vdev);
	unsigned int i;

	vop_put_queue_vectors(vd);
	if (vd->irq_requested) {
		free_irq(pci_irq_vector(vd->card->pdev, vd->vector), vd);
		vd->irq_requested = false;
	}
	for (i = 0; i < vd->nvqs; i++) {
		if (vd->vqs[i])
			vring_del_virtqueue(vd->vqs[i]);
		vd->vqs[i] = NULL;
	}
	vd->nvqs = 0;
}

static struct virtqueue *vop_setup_vq(struct vop_vdev *vd, unsigned int index,
				      void (*callback)(struct virtqueue *vq),
				      const char *name, bool ctx)
{
	struct vop_card *card = vd->card;
	struct mic_vqconfig *vqc = &vd->vqconfig[index];
	struct mic_vring_info *info;
	struct virtqueue *vq;
	u64 addr, used;
	unsigned int num;
	size_t size;
	u32 magic, want;
	void *va;

	addr = le64_to_cpu(READ_ONCE(vqc->address));
	used = le64_to_cpu(READ_ONCE(vqc->used_address));
	num = le16_to_cpu(READ_ONCE(vqc->num));

	if (!num || num > MIC_MAX_VRING_ENTRIES || !is_power_of_2(num)) {
		dev_err(&vd->vdev.dev, "vq %u: bad ring size %u\n", index, num);
		return ERR_PTR(-EINVAL);
	}
	size = vring_size(num, MIC_VIRTIO_RING_ALIGN);
	if (!IS_ALIGNED(addr, PAGE_SIZE) || addr > card->aperture_size ||
	    card->aperture_size - addr < size + sizeof(*info)) {
		dev_err(&vd->vdev.dev,
			"vq %u: ring at 0x%llx (%zu bytes) outside the aperture\n",
			index, addr, size + sizeof(*info));
		return ERR_PTR(-EINVAL);
	}
	if (used)
		dev_warn(&vd->vdev.dev,
			 "vq %u: used_address 0x%llx is not 0, ignored\n",
			 index, used);

	va = card->aperture + addr;
	info = va + size;
	magic = le32_to_cpu(READ_ONCE(info->magic));
	want = MIC_MAGIC + (u32)(s32)vd->type + index;
	if (magic != want) {
		dev_err(&vd->vdev.dev, "vq %u: ring magic 0x%08x, expected 0x%08x\n",
			index, magic, want);
		return ERR_PTR(-EIO);
	}

	memset(va, 0, size);
	vq = vring_new_virtqueue(index, num, MIC_VIRTIO_RING_ALIGN, &vd->vdev,
				 true, ctx, va, vop_notify, callback, name);
	if (!vq) {
		dev_err(&vd->vdev.dev, "vq %u: cannot create the virtqueue\n",
			index);
		return ERR_PTR(-ENOMEM);
	}
	return vq;
}

static int vop_start_vqs(struct vop_vdev *vd)
{
	struct vop_card *card = vd->card;
	int err;

	snprintf(vd->irq_name, sizeof(vd->irq_name), "%s-vdev%u",
		 DRV_NAME, vd->vdev.index);
	err = request_irq(pci_irq_vector(card->pdev, vd->vector),
			  vop_vdev_interrupt, 0, vd->irq_name, vd);
	if (err) {
		dev_err(&vd->vdev.dev, "cannot request vector %u: %d\n",
			vd->vector, err);
		return err;
	}
	vd->irq_requested = true;
	return 0;
}

/*
 * What find_vqs needs of each queue.  Linux 6.11 passes exactly this as
 * struct virtqueue_info; older kernels pass three parallel arrays, which
 * the wrapper below turns into it.
 */
#if LINUX_VERSION_CODE >= KERNEL_VERSION(6, 11, 0)
#define vop_vq_info virtqueue_info
#else
struct vop_vq_info {
	vq_callback_t *callback;
	const char *name;
	bool ctx;
};
#endif

static int vop_find_vqs_info(struct virtio_device *vdev, unsigned int nvqs,
			     struct virtqueue *vqs[],
			     const struct vop_vq_info *info)
{
	struct vop_vdev *vd = to_vop_vdev(vdev);
	unsigned int i, queue_idx = 0;
	int err;

	for (i = 0; i < nvqs; i++) {
		if (!info[i].name) {
			vqs[i] = NULL;
			continue;
		}
		if (queue_idx >= vd->num_vq) {
			err = -ENOENT;
			goto fail;
		}
		vqs[i] = vop_setup_vq(vd, queue_idx, info[i].callback,
				      info[i].name, info[i].ctx);
		if (IS_ERR(vqs[i])) {
			err = PTR_ERR(vqs[i]);
			goto fail;
		}
		vd->vqs[queue_idx++] = vqs[i];
		vd->nvqs = queue_idx;
	}
	err = vop_start_vqs(vd);
	if (err)
		goto fail;
	vop_get_queue_vectors(vd);
	return 0;
fail:
	vop_del_vqs(vdev);
	return err;
}

#if LINUX_VERSION_CODE >= KERNEL_VERSION(6, 11, 0)
static int vop_find_vqs(struct virtio_device *vdev, unsigned int nvqs,
			struct virtqueue *vqs[],
			struct virtqueue_info vqs_info[],
			struct irq_affinity *desc)
{
	return vop_find_vqs_info(vdev, nvqs, vqs, vqs_info);
}
#else
static int vop_find_vqs(struct virtio_device *vdev, unsigned int nvqs,
			struct virtqueue *vqs[], vq_callback_t *callbacks[],
			const char * const names[], const bool *ctx,
			struct irq_affinity *desc)
{
	struct vop_vq_info *info;
	unsigned int i;
	int err;

	info = kcalloc(nvqs, sizeof(*info), GFP_KERNEL);
	if (!info)
		return -ENOMEM;
	for (i = 0; i < nvqs; i++) {
		info[i].callback = callbacks[i];
		info[i].name = names[i];
		info[i].ctx = ctx ? ctx[i] : false;
	}
	err = vop_find_vqs_info(vdev, nvqs, vqs, info);
	kfree(info);
	return err;
}
#endif

static void vop_synchronize_cbs(struct virtio_device *vdev)
{
	struct vop_vdev *vd = to_vop_vdev(vdev);
	unsigned int i;

	if (vd->irq_requested)
		synchronize_irq(pci_irq_vector(vd->card->pdev, vd->vector));
	for (i = 0; i < vd->nvqs; i++)
		if (vd->vq_vector[i])
			synchronize_irq(pci_irq_vector(vd->card->pdev,
						       vd->vq_vector[i]));
}

static const char *vop_bus_name(struct virtio_device *vdev)
{
	return pci_name(to_vop_vdev(vdev)->card->pdev);
}

static const struct virtio_config_ops vop_config_ops = {
	.get			= vop_get,
	.set			= vop_set,
	.get_status		= vop_get_status,
	.set_status		= vop_set_status,
	.reset			= vop_reset,
	.find_vqs		= vop_find_vqs,
	.del_vqs		= vop_del_vqs,
	.synchronize_cbs	= vop_synchronize_cbs,
	.get_features		= vop_get_features,
	.finalize_features	= vop_finalize_features,
	.bus_name		= vop_bus_name,
};

/* ------------------------------------------------------------------ */
/* device page                                                          */

static void vop_release_vdev(struct device *dev)
{
	struct virtio_device *vdev = dev_to_virtio(dev);

	kfree(to_vop_vdev(vdev));
}

/*
 * Atomic, without card->lock: queues take vectors from find_vqs, which a
 * virtio driver's probe calls with or without that lock held.
 */
static int vop_alloc_vector(struct vop_card *card)
{
	unsigned int v;

	/* vector 0 is the control vector */
	for (v = 1; v < card->nvec; v++)
		if (!test_and_set_bit(v, card->vectors_used))
			return v;
	return -ENOSPC;
}

static void vop_free_vector(struct vop_card *card, unsigned int v)
{
	if (v > 0 && v < card->nvec)
		clear_bit(v, card->vectors_used);
}

static struct vop_vdev *vop_find_vdev(struct vop_card *card, unsigned int off)
{
	struct vop_vdev *vd;

	lockdep_assert_held(&card->lock);
	list_for_each_entry(vd, &card->vdevs, node)
		if (vd->desc_off == off)
			return vd;
	return NULL;
}

enum vop_remove_how {
	VOP_REMOVE_LOCAL,	/* card-side teardown; the descriptor is intact */
	VOP_REMOVE_HOST,	/* host asked (config_change 1): ack when done */
	VOP_REMOVE_DETACHED,	/* descriptor gone or reused: do not touch it */
};

/* unregister a device */
static void vop_remove_vdev(struct vop_card *card, struct vop_vdev *vd,
			    enum vop_remove_how how)
{
	struct mic_device_ctrl *ctrl = vd->ctrl;
	unsigned int vector = vd->vector;
	s8 type = vd->type;
	unsigned int off = vd->desc_off;

	lockdep_assert_held(&card->lock);
	list_del(&vd->node);
	if (how == VOP_REMOVE_DETACHED) {
		vd->shadow_status = READ_ONCE(vd->desc->status);
		/* status first: the ops test detached without a lock */
		smp_wmb();
		WRITE_ONCE(vd->detached, true);
	}
	/* the driver's remove resets the device and deletes the vqs */
	unregister_virtio_device(&vd->vdev);	/* drops the last reference */
	vop_free_vector(card, vector);
	if (how != VOP_REMOVE_DETACHED)
		WRITE_ONCE(ctrl->h2c_vdev_db, -1);
	if (how == VOP_REMOVE_HOST) {
		/* the control block is written before the ack */
		smp_wmb();
		WRITE_ONCE(ctrl->guest_ack, 1);
	}
	dev_info(vop_dev(card), "removed virtio device type %d at 0x%x%s\n",
		 type, off, how == VOP_REMOVE_HOST ? " (host request)" :
		 how == VOP_REMOVE_DETACHED ? " (descriptor gone)" : "");
}

static void vop_remove_all(struct vop_card *card, enum vop_remove_how how)
{
	struct vop_vdev *vd, *tmp;

	lockdep_assert_held(&card->lock);
	list_for_each_entry_safe(vd, tmp, &card->vdevs, node)
		vop_remove_vdev(card, vd, how);
}

static void vop_add_vdev(struct vop_card *card, struct mic_device_desc *desc,
			 unsigned int off, s8 type, u8 num_vq, u8 feature_len,
			 u8 config_len)
{
	struct device *dev = vop_dev(card);
	struct mic_device_ctrl *ctrl;
	struct vop_vdev *vd;
	unsigned int dsize;
	int c2h, vector, err;

	lockdep_assert_held(&card->lock);
	dsize = mic_desc_size(num_vq, feature_len, config_len);
	ctrl = (void *)desc + dsize;

	c2h = READ_ONCE(ctrl->c2h_vdev_db);
	if (c2h < 0 || c2h >= card->num_doorbells) {
		dev_err(dev, "descriptor at 0x%x: c2h_vdev_db %d out of range, skipped\n",
			off, c2h);
		return;
	}

	vd = kzalloc(sizeof(*vd), GFP_KERNEL);
	if (!vd)
		return;
	vector = vop_alloc_vector(card);
	if (vector < 0) {
		dev_err(dev, "descriptor at 0x%x: no free MSI-X vector, skipped\n",
			off);
		kfree(vd);
		return;
	}

	vd->card = card;
	vd->desc_off = off;
	vd->type = type;
	vd->num_vq = num_vq;
	vd->feature_len = feature_len;
	vd->config_len = config_len;
	vd->desc = desc;
	vd->vqconfig = (struct mic_vqconfig *)desc->config;
	vd->host_features = (u8 *)(vd->vqconfig + num_vq);
	vd->acked_features = vd->host_features + feature_len;
	vd->config = vd->acked_features + feature_len;
	vd->ctrl = ctrl;
	vd->c2h_db = c2h;
	vd->vector = vector;

	vd->vdev.dev.parent = dev;
	vd->vdev.dev.release = vop_release_vdev;
	vd->vdev.id.device = (u8)type;
	vd->vdev.id.vendor = MIC_X100_PCI_VENDOR;
	vd->vdev.config = &vop_config_ops;

	/* publish our vector, then learn the host's doorbell */
	WRITE_ONCE(ctrl->h2c_vdev_db, vector);
	smp_wmb();

	vd->cookie = ++card->next_cookie;
	WRITE_ONCE(ctrl->vdev, cpu_to_le64(vd->cookie));

	list_add_tail(&vd->node, &card->vdevs);
	err = register_virtio_device(&vd->vdev);
	if (err) {
		dev_err(dev, "descriptor at 0x%x: registering virtio device type %d failed: %d\n",
			off, type, err);
		list_del(&vd->node);
		WRITE_ONCE(ctrl->vdev, 0);
		WRITE_ONCE(ctrl->h2c_vdev_db, -1);
		vop_free_vector(card, vector);
		put_device(&vd->vdev.dev);
		return;
	}
	dev_info(dev, "virtio device type %d at 0x%x: %u vqs, c2h doorbell %d, vector %d (%s)\n",
		 type, off, num_vq, c2h, vector, dev_name(&vd->vdev.dev));
}

/* walk the device page */
static void vop_scan(struct vop_card *card)
{
	struct device *dev = vop_dev(card);
	struct vop_vdev *vd;
	unsigned int off = sizeof(struct mic_bootparam);

	lockdep_assert_held(&card->lock);

	while (off + sizeof(struct mic_device_desc) <= MIC_DP_SIZE) {
		struct mic_device_desc *desc = card->page + off;
		struct mic_device_ctrl *ctrl;
		u8 num_vq, flen, clen, cc;
		unsigned int total;
		s8 type;

		type = READ_ONCE(desc->type);
		if (type == 0)
			break;
		/* pairs with the host's write barrier before it sets type */
		rmb();
		num_vq = READ_ONCE(desc->num_vq);
		flen = READ_ONCE(desc->feature_len);
		clen = READ_ONCE(desc->config_len);
		total = mic_total_desc_size(num_vq, flen, clen);

		if (off + total > MIC_DP_SIZE) {
			dev_err_ratelimited(dev,
				"descriptor at 0x%x (%u bytes) runs past the device page, scan stopped\n",
				off, total);
			break;
		}

		vd = vop_find_vdev(card, off);
		if (vd && (vd->type != type || vd->num_vq != num_vq ||
			   vd->feature_len != flen || vd->config_len != clen ||
			   le64_to_cpu(READ_ONCE(vd->ctrl->vdev)) != vd->cookie)) {
			/* the slot was reused without us noticing the removal */
			vop_remove_vdev(card, vd, VOP_REMOVE_DETACHED);
			vd = NULL;
		}

		if (type == -1) {
			/* removed by the host without waiting for us */
			if (vd)
				vop_remove_vdev(card, vd, VOP_REMOVE_DETACHED);
			goto next;
		}

		if (!vd && (num_vq > MIC_MAX_VQS ||
			    flen < MIC_MIN_FEATURE_LEN ||
			    flen > MIC_MAX_FEATURE_LEN ||
			    total > MIC_MAX_DESC_SIZE)) {
			dev_err_ratelimited(dev,
				"descriptor at 0x%x (type %d, %u vqs, feature_len %u, config_len %u) breaks the limits, skipped\n",
				off, type, num_vq, flen, clen);
			goto next;
		}

		ctrl = (void *)desc + mic_desc_size(num_vq, flen, clen);
		cc = READ_ONCE(ctrl->config_change);
		if (vd) {
			if (cc == MIC_VIRTIO_PARAM_DEV_REMOVE) {
				vop_remove_vdev(card, vd, VOP_REMOVE_HOST);
			} else if (cc == MIC_VIRTIO_PARAM_CONFIG_CHANGED &&
				   !READ_ONCE(ctrl->guest_ack)) {
				virtio_config_changed(&vd->vdev);
				smp_wmb();
				WRITE_ONCE(ctrl->guest_ack, 1);
			}
		} else if (cc == MIC_VIRTIO_PARAM_DEV_REMOVE) {
			/* being removed: acknowledge, never add */
			if (!READ_ONCE(ctrl->guest_ack)) {
				WRITE_ONCE(ctrl->h2c_vdev_db, -1);
				smp_wmb();
				WRITE_ONCE(ctrl->guest_ack, 1);
			}
		} else if (!READ_ONCE(card->stopping)) {
			vop_add_vdev(card, desc, off, type, num_vq, flen, clen);
		}
next:
		off += total;
	}

	/*
	 * Devices after a type 0 entry are kept: the host writes type 0 into a
	 * slot it is filling (hot add) and the real type when it is done.
	 */
}

/* the page the card uses, for the control path and for the beat */
static void vop_set_page(struct vop_card *card, void *page)
{
	lockdep_assert_held(&card->lock);
	spin_lock(&card->beat_lock);
	card->page = page;
	spin_unlock(&card->beat_lock);
}

/*
 * One beat (docs/vop-abi.md 5.6): a new count in the heartbeat block of the
 * page, if the host offers one there.  The host watches the count change;
 * a card that stops running its timers (a hang, interrupts off, a frozen
 * machine) stops changing it.
 */
static void vop_beat_work(struct work_struct *work)
{
	struct vop_card *card = container_of(to_delayed_work(work),
					     struct vop_card, beat_work);
	struct mic_heartbeat *hb;

	if (READ_ONCE(card->stopping))
		return;
	spin_lock(&card->beat_lock);
	if (card->page) {
		hb = card->page + MIC_HEARTBEAT_OFFSET;
		if (le32_to_cpu(READ_ONCE(hb->magic)) == MIC_HEARTBEAT_MAGIC) {
			WRITE_ONCE(hb->period_ms, cpu_to_le32(heartbeat_ms));
			/* a count of 0 means "no beat yet" to the host */
			if (!++card->beats)
				card->beats = 1;
			WRITE_ONCE(hb->count, cpu_to_le32(card->beats));
		}
	}
	spin_unlock(&card->beat_lock);
	queue_delayed_work(system_wq, &card->beat_work,
			   msecs_to_jiffies(heartbeat_ms));
}

/* look at the scratchpads */
static void vop_check_page(struct vop_card *card)
{
	struct device *dev = vop_dev(card);
	struct mic_bootparam *bp;
	u64 off;
	u32 magic;

	lockdep_assert_held(&card->lock);
	off = (u64)vop_rreg(card, MIC_REG_SPAD(MIC_DPHI_SPAD)) << 32 |
	      vop_rreg(card, MIC_REG_SPAD(MIC_DPLO_SPAD));

	if (!off) {
		if (!card->page && !card->waiting_logged) {
			dev_info(dev, "waiting for the host to publish the device page\n");
			card->waiting_logged = true;
		}
		return;
	}

	if (card->page && off == card->page_off) {
		bp = card->page;
		magic = le32_to_cpu(READ_ONCE(bp->magic));
		if (magic != MIC_MAGIC) {
			dev_err_ratelimited(dev, "device page magic is now 0x%08x, not scanned\n",
					    magic);
			return;
		}
		vop_scan(card);
		return;
	}

	/* a new page: forget the devices of the old one */
	if (card->page) {
		dev_info(dev, "device page moved from 0x%llx to 0x%llx\n",
			 card->page_off, off);
		/* the old page and its rings may be reused by now */
		vop_remove_all(card, VOP_REMOVE_DETACHED);
		vop_set_page(card, NULL);
		card->page_off = 0;
	}

	if (off > card->aperture_size || card->aperture_size - off < MIC_DP_SIZE ||
	    !IS_ALIGNED(off, 8)) {
		if (card->rejected_off != off)
			dev_err(dev, "device page offset 0x%llx outside the aperture (0x%llx bytes)\n",
				off, card->aperture_size);
		card->rejected_off = off;
		return;
	}
	bp = card->aperture + off;
	magic = le32_to_cpu(READ_ONCE(bp->magic));
	if (magic != MIC_MAGIC) {
		if (card->rejected_off != off)
			dev_err(dev, "device page at 0x%llx has magic 0x%08x, expected 0x%08x\n",
				off, magic, MIC_MAGIC);
		card->rejected_off = off;
		return;
	}
	rmb();

	card->rejected_off = 0;
	vop_set_page(card, bp);
	card->page_off = off;
	dev_info(dev, "device page at aperture offset 0x%llx, node %u\n",
		 off, READ_ONCE(bp->node_id));

	/* host-to-card config doorbell: the control vector */
	WRITE_ONCE(bp->h2c_config_db, MIC_CTRL_VECTOR);
	smp_wmb();

	vop_scan(card);

	if (!READ_ONCE(card->stopping)) {
		vop_wreg(card, MIC_REG_SHUTDOWN_STATUS, MIC_STATUS_NOP);
		vop_wreg(card, MIC_REG_CARD_STATE, MIC_STATE_ONLINE);
		dev_info(dev, "card online\n");
		/* the first beat on a new page comes now, not a period later */
		if (heartbeat_ms)
			mod_delayed_work(system_wq, &card->beat_work, 0);
	}
}

static void vop_ctrl_work(struct work_struct *work)
{
	struct vop_card *card = container_of(work, struct vop_card, ctrl_work);
	u32 req;

	mutex_lock(&card->lock);
	if (READ_ONCE(card->stopping))
		goto out;

	req = vop_rreg(card, MIC_REG_HOST_REQUEST);
	if (req == MIC_HOST_REQ_SHUTDOWN) {
		vop_wreg(card, MIC_REG_HOST_REQUEST, MIC_HOST_REQ_NONE);
		dev_info(vop_dev(card), "host requests shutdown, powering off\n");
		orderly_poweroff(true);
	} else if (req != MIC_HOST_REQ_NONE) {
		dev_warn_ratelimited(vop_dev(card), "unknown host request %u\n", req);
	}

	vop_check_page(card);
	/* no page (any more): look again periodically, too */
	if (!card->page && poll_ms && !READ_ONCE(card->stopping))
		queue_delayed_work(card->wq, &card->poll_work,
				   msecs_to_jiffies(poll_ms));
out:
	mutex_unlock(&card->lock);
}

static void vop_poll_work(struct work_struct *work)
{
	struct vop_card *card = container_of(to_delayed_work(work),
					     struct vop_card, poll_work);

	if (READ_ONCE(card->page) || READ_ONCE(card->stopping) || !poll_ms)
		return;
	queue_work(card->wq, &card->ctrl_work);
	queue_delayed_work(card->wq, &card->poll_work,
			   msecs_to_jiffies(poll_ms));
}

static irqreturn_t vop_ctrl_interrupt(int irq, void *opaque)
{
	struct vop_card *card = opaque;

	queue_work(card->wq, &card->ctrl_work);
	return IRQ_HANDLED;
}

/* ------------------------------------------------------------------ */
/* lifecycle notifications                                              */

static int vop_reboot_notify(struct notifier_block *nb, unsigned long action,
			     void *data)
{
	struct vop_card *card = container_of(nb, struct vop_card, reboot_nb);
	u32 status;

	switch (action) {
	case SYS_HALT:
		status = MIC_STATUS_HALTED;
		break;
	case SYS_POWER_OFF:
		status = MIC_STATUS_POWER_OFF;
		break;
	case SYS_RESTART:
		status = MIC_STATUS_RESTART;
		break;
	default:
		return NOTIFY_DONE;
	}
	WRITE_ONCE(card->stopping, true);
	vop_wreg(card, MIC_REG_SHUTDOWN_STATUS, status);
	vop_wreg(card, MIC_REG_CARD_STATE, MIC_STATE_SHUTTING_DOWN);
	dev_info(vop_dev(card), "card shutting down (status %u)\n", status);
	return NOTIFY_DONE;
}

static int vop_panic_notify(struct notifier_block *nb, unsigned long action,
			    void *data)
{
	struct vop_card *card = container_of(nb, struct vop_card, panic_nb);

	WRITE_ONCE(card->stopping, true);
	vop_wreg(card, MIC_REG_SHUTDOWN_STATUS, MIC_STATUS_CRASHED);
	vop_wreg(card, MIC_REG_CARD_STATE, MIC_STATE_SHUTTING_DOWN);
	return NOTIFY_DONE;
}

/* ------------------------------------------------------------------ */
/* PCI                                                                  */

/* devm actions for what has no managed variant in every kernel we build for */
static void vop_destroy_wq(void *wq)
{
	destroy_workqueue(wq);
}

static void vop_unregister_panic_notifier(void *nb)
{
	atomic_notifier_chain_unregister(&panic_notifier_list, nb);
}

static void vop_stop_beat(void *data)
{
	struct vop_card *card = data;

	WRITE_ONCE(card->stopping, true);
	cancel_delayed_work_sync(&card->beat_work);
}

/*
 * Everything probe sets up is device-managed (pcim_*, devm_*) and released
 * in reverse order after vop_remove(), or when probe fails.
 */
static int vop_probe(struct pci_dev *pdev, const struct pci_device_id *id)
{
	struct device *dev = &pdev->dev;
	struct vop_card *card;
	resource_size_t ap_len;
	u32 magic, abi, nvec;
	u64 ap_size;
	int err;

	card = devm_kzalloc(dev, sizeof(*card), GFP_KERNEL);
	if (!card)
		return -ENOMEM;
	card->pdev = pdev;
	mutex_init(&card->lock);
	INIT_LIST_HEAD(&card->vdevs);
	INIT_WORK(&card->ctrl_work, vop_ctrl_work);
	INIT_DELAYED_WORK(&card->poll_work, vop_poll_work);
	spin_lock_init(&card->beat_lock);
	INIT_DELAYED_WORK(&card->beat_work, vop_beat_work);
	pci_set_drvdata(pdev, card);

	err = pcim_enable_device(pdev);
	if (err)
		return err;
	if (!(pci_resource_flags(pdev, MIC_BAR_REGS) & IORESOURCE_MEM) ||
	    pci_resource_len(pdev, MIC_BAR_REGS) < MIC_REGS_SIZE ||
	    !(pci_resource_flags(pdev, MIC_BAR_APERTURE) & IORESOURCE_MEM)) {
		dev_err(dev, "unexpected BAR layout\n");
		return -ENODEV;
	}
	/* the BARs; released with the device since it is pcim-enabled */
	err = pci_request_regions(pdev, DRV_NAME);
	if (err)
		return err;
	pci_set_master(pdev);
	card->regs = pcim_iomap(pdev, MIC_BAR_REGS, MIC_REGS_SIZE);
	if (!card->regs)
		return -ENOMEM;

	magic = vop_rreg(card, MIC_REG_MAGIC);
	abi = vop_rreg(card, MIC_REG_ABI_VERSION);
	if (magic != MIC_REGS_MAGIC) {
		dev_err(dev, "register magic 0x%08x, expected 0x%08x\n",
			magic, MIC_REGS_MAGIC);
		return -ENODEV;
	}
	if (MIC_VERSION_MAJOR(abi) != MIC_ABI_VERSION_MAJOR) {
		dev_err(dev, "ABI version %u.%u not supported (major %u)\n",
			MIC_VERSION_MAJOR(abi), MIC_VERSION_MINOR(abi),
			MIC_ABI_VERSION_MAJOR);
		return -ENODEV;
	}

	card->num_doorbells = min_t(u32, vop_rreg(card, MIC_REG_NUM_DOORBELLS),
				    MIC_NUM_DOORBELLS);
	nvec = min_t(u32, vop_rreg(card, MIC_REG_NUM_VECTORS), MIC_NUM_VECTORS);
	ap_size = (u64)vop_rreg(card, MIC_REG_APERTURE_HI) << 32 |
		  vop_rreg(card, MIC_REG_APERTURE_LO);
	ap_len = pci_resource_len(pdev, MIC_BAR_APERTURE);
	if (ap_size > ap_len) {
		dev_warn(dev, "APERTURE_SIZE 0x%llx larger than BAR2 (0x%llx), using BAR2's\n",
			 ap_size, (u64)ap_len);
		ap_size = ap_len;
	}
	if (!ap_size || ap_size < MIC_DP_SIZE || !nvec) {
		dev_err(dev, "unusable device: aperture 0x%llx bytes, %u vectors\n",
			ap_size, nvec);
		return -ENODEV;
	}
	card->aperture_size = ap_size;
	card->aperture = devm_memremap(dev, pci_resource_start(pdev, MIC_BAR_APERTURE),
				       ap_size, MEMREMAP_WB);
	if (IS_ERR(card->aperture)) {
		dev_err(dev, "cannot map the aperture\n");
		return PTR_ERR(card->aperture);
	}

	/* freed with the device since it is pcim-enabled */
	err = pci_alloc_irq_vectors(pdev, 1, nvec, PCI_IRQ_MSIX);
	if (err < 0) {
		dev_err(dev, "cannot enable MSI-X: %d\n", err);
		return err;
	}
	card->nvec = err;
	set_bit(MIC_CTRL_VECTOR, card->vectors_used);

	card->wq = alloc_ordered_workqueue("%s-%s", 0, DRV_NAME, pci_name(pdev));
	if (!card->wq)
		return -ENOMEM;
	err = devm_add_action_or_reset(dev, vop_destroy_wq, card->wq);
	if (err)
		return err;

	err = devm_request_irq(dev, pci_irq_vector(pdev, MIC_CTRL_VECTOR),
			       vop_ctrl_interrupt, 0, DRV_NAME "-ctrl", card);
	if (err) {
		dev_err(dev, "cannot request the control vector: %d\n", err);
		return err;
	}

	card->reboot_nb.notifier_call = vop_reboot_notify;
	err = devm_register_reboot_notifier(dev, &card->reboot_nb);
	if (err)
		return err;
	card->panic_nb.notifier_call = vop_panic_notify;
	atomic_notifier_chain_register(&panic_notifier_list, &card->panic_nb);
	err = devm_add_action_or_reset(dev, vop_unregister_panic_notifier,
				       &card->panic_nb);
	if (err)
		return err;

	dev_info(dev, "MIC X100 family %u stepping 0x%02x node %u, ABI %u.%u, aperture %llu KiB, %u vectors, %u doorbells\n",
		 vop_rreg(card, MIC_REG_FAMILY), vop_rreg(card, MIC_REG_STEPPING),
		 vop_rreg(card, MIC_REG_NODE_ID), MIC_VERSION_MAJOR(abi),
		 MIC_VERSION_MINOR(abi), ap_size >> 10, card->nvec,
		 card->num_doorbells);

	/* stopped before the mappings it writes through are released */
	err = devm_add_action_or_reset(dev, vop_stop_beat, card);
	if (err)
		return err;

	queue_work(card->wq, &card->ctrl_work);
	if (poll_ms)
		queue_delayed_work(card->wq, &card->poll_work,
				   msecs_to_jiffies(poll_ms));
	if (heartbeat_ms)
		queue_delayed_work(system_wq, &card->beat_work,
				   msecs_to_jiffies(heartbeat_ms));
	return 0;
}

/*
 * Stops the control path and drops the devices; the managed resources
 * (notifiers, the control interrupt, the work queue, vectors, mappings,
 * regions) are released after this returns.  With stopping set, a control
 * interrupt that still arrives queues work that does nothing.
 */
static void vop_remove(struct pci_dev *pdev)
{
	struct vop_card *card = pci_get_drvdata(pdev);

	mutex_lock(&card->lock);
	WRITE_ONCE(card->stopping, true);
	mutex_unlock(&card->lock);

	cancel_delayed_work_sync(&card->poll_work);
	cancel_work_sync(&card->ctrl_work);
	cancel_delayed_work_sync(&card->beat_work);

	mutex_lock(&card->lock);
	vop_remove_all(card, VOP_REMOVE_LOCAL);
	if (card->page) {
		struct mic_heartbeat *hb = card->page + MIC_HEARTBEAT_OFFSET;

		WRITE_ONCE(((struct mic_bootparam *)card->page)->h2c_config_db, -1);
		/* an unloaded driver is not a hung card: back to "no beat yet" */
		if (le32_to_cpu(READ_ONCE(hb->magic)) == MIC_HEARTBEAT_MAGIC)
			WRITE_ONCE(hb->count, 0);
	}
	vop_set_page(card, NULL);
	mutex_unlock(&card->lock);
}

static const struct pci_device_id vop_pci_ids[] = {
	{ PCI_DEVICE(MIC_X100_PCI_VENDOR, MIC_X100_PCI_DEVICE_2250) },
	{ }
};
MODULE_DEVICE_TABLE(pci, vop_pci_ids);

static struct pci_driver vop_pci_driver = {
	.name		= DRV_NAME,
	.id_table	= vop_pci_ids,
	.probe		= vop_probe,
	.remove		= vop_remove,
};
module_pci_driver(vop_pci_driver);

MODULE_DESCRIPTION("Virtio over PCIe (VOP) transport, card side, for the emulated Intel MIC X100");
MODULE_LICENSE("GPL");
