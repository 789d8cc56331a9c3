/*
 * Intel MIC X100 coprocessor card, as seen by the card OS
 *
 * The card's registers (BAR0), the aperture (BAR2, host memory shared with
 * the card) and its MSI-X vectors (BAR4).  Everything virtio-over-PCIe means
 * lives in a host-side process that talks to this device over a UNIX socket
 * chardev: it receives the card's RAM and the aperture as file descriptors,
 * registers eventfds on doorbells and vectors, and sees register writes,
 * unmatched doorbell writes and card power events as messages.
 *
 * Register map and semantics: docs/vop-abi.md.
 * Socket protocol: docs/device-protocol.md.
 * Both are defined for the code in mic_x100_vop.h, the card driver's
 * header (guest-images/driver/), which scripts/build-qemu places beside
 * this file.
 *
 * Copyright (c) the mic-x100 authors
 *
 * SPDX-License-Identifier: GPL-2.0-or-later
 */

#include "qemu/osdep.h"

/*
 * One source for QEMU 10.0 up to 11.x: headers that moved are found with
 * __has_include, signatures that changed follow QEMU_VERSION_MAJOR/MINOR.
 */
#if QEMU_VERSION_MAJOR > 10 || (QEMU_VERSION_MAJOR == 10 && QEMU_VERSION_MINOR >= 1)
#define MIC_CLASS_DATA const void *             /* 10.1: const class data */
#else
#define MIC_CLASS_DATA void *
#endif

#include "qemu/units.h"
#include "qemu/error-report.h"
#include "qemu/event_notifier.h"
#include "qemu/main-loop.h"
#include "qemu/memfd.h"
#include "qemu/module.h"
#include "qemu/queue.h"
#include "qemu/log.h"
#include "qapi/error.h"
#include "hw/pci/pci_device.h"
#include "hw/pci/msi.h"
#include "hw/pci/msix.h"
#if __has_include("hw/core/boards.h")                  /* 11.0 */
#include "hw/core/boards.h"
#else
#include "hw/boards.h"
#endif
#if __has_include("hw/core/qdev-properties.h")         /* 11.0 */
#include "hw/core/qdev-properties.h"
#else
#include "hw/qdev-properties.h"
#endif
#if __has_include("hw/core/qdev-properties-system.h")  /* 11.0 */
#include "hw/core/qdev-properties-system.h"
#else
#include "hw/qdev-properties-system.h"
#endif
#if __has_include("system/memory.h")                   /* 10.1 */
#include "system/memory.h"
#include "system/ramblock.h"
#else
#include "exec/memory.h"
#include "exec/ramblock.h"
#endif
#include "chardev/char-fe.h"
#include "migration/blocker.h"
#include "system/kvm.h"
#include "system/runstate.h"
#include "qom/object.h"

/*
 * The chardev frontend type, CharBackend in 10.0 and CharFrontend later,
 * taken from a public device state that embeds one under a stable name.
 */
#include "hw/char/serial.h"
typedef __typeof__(((SerialState *)NULL)->chr) MicCharFe;

#if QEMU_VERSION_MAJOR >= 11                           /* accel_irqchip_* */
#include "system/accel-irq.h"
typedef AccelRouteChange MicRouteChange;
#define mic_routes_begin()            accel_irqchip_begin_route_changes()
#define mic_route_add_msi(c, v, d)    accel_irqchip_add_msi_route(c, v, d)
#define mic_routes_commit_changes(c)  accel_irqchip_commit_route_changes(c)
#define mic_route_update(virq, m, d)  accel_irqchip_update_msi_route(virq, m, d)
#define mic_routes_commit()           accel_irqchip_commit_routes()
#define mic_route_release(virq)       accel_irqchip_release_virq(virq)
#define mic_irqfd_add(n, virq) \
    accel_irqchip_add_irqfd_notifier_gsi(n, NULL, virq)
#define mic_irqfd_remove(n, virq) \
    accel_irqchip_remove_irqfd_notifier_gsi(n, virq)
#else
typedef KVMRouteChange MicRouteChange;
#define mic_routes_begin()            kvm_irqchip_begin_route_changes(kvm_state)
#define mic_route_add_msi(c, v, d)    kvm_irqchip_add_msi_route(c, v, d)
#define mic_routes_commit_changes(c)  kvm_irqchip_commit_route_changes(c)
#define mic_route_update(virq, m, d) \
    kvm_irqchip_update_msi_route(kvm_state, virq, m, d)
#define mic_routes_commit()           kvm_irqchip_commit_routes(kvm_state)
#define mic_route_release(virq)       kvm_irqchip_release_virq(kvm_state, virq)
#define mic_irqfd_add(n, virq) \
    kvm_irqchip_add_irqfd_notifier_gsi(kvm_state, n, NULL, virq)
#define mic_irqfd_remove(n, virq) \
    kvm_irqchip_remove_irqfd_notifier_gsi(kvm_state, n, virq)
#endif

#define TYPE_MIC_X100 "mic-x100"
OBJECT_DECLARE_SIMPLE_TYPE(MicX100State, MIC_X100)

#include "mic_x100_vop.h"
#include "trace.h"

/* QEMU-style names for the header's protocol structs */
typedef struct mic_msg_hdr MicMsgHdr;

typedef struct MicDoorbellFd {
    EventNotifier notifier;
    uint32_t doorbell;
    uint32_t value;
    QLIST_ENTRY(MicDoorbellFd) next;
} MicDoorbellFd;

typedef struct MicVectorFd {
    EventNotifier notifier;
    MicX100State *s;
    uint32_t vector;
    bool irqfd;                 /* attached to the vector's KVM route */
    QLIST_ENTRY(MicVectorFd) next;
} MicVectorFd;

typedef struct MicVector {
    QLIST_HEAD(, MicVectorFd) fds;
    int virq;                   /* KVM MSI route, -1 when none */
    bool unmasked;              /* as last told by the MSI-X notifiers */
} MicVector;

/*
 * One message waiting for the chardev to take it (docs/device-protocol.md,
 * "Flow control"). The fds are our own duplicates, closed once sent.
 */
typedef struct MicTxMsg {
    uint8_t *buf;
    uint32_t len;
    uint32_t off;               /* bytes already written */
    uint32_t type;
    int fds[MIC_MSG_MAX_FDS];
    int nfds;
    QSIMPLEQ_ENTRY(MicTxMsg) next;
} MicTxMsg;

/*
 * Bounds on what a peer that does not read can make the device hold, and on
 * what it can register (docs/device-protocol.md, "Flow control" and
 * "Registration limits").
 */
#define MIC_TX_QUEUE_MAX_BYTES  (64 * KiB)
#define MIC_MAX_DOORBELL_FDS    256
#define MIC_MAX_VECTOR_FDS      256

typedef struct MicMemRegion {
    uint64_t gpa;
    uint64_t size;
    uint64_t fd_offset;
    int fd;
} MicMemRegion;

struct MicX100State {
    PCIDevice parent_obj;

    /* properties */
    MicCharFe chr;
    uint64_t aperture_size;
    uint32_t node_id;
    uint8_t stepping;

    MemoryRegion mmio;
    MemoryRegion aperture;

    /* rw registers */
    uint32_t card_state;
    uint32_t shutdown_status;
    uint32_t host_request;
    uint32_t spad[MIC_NUM_SPADS];

    /* host-side registrations */
    QLIST_HEAD(, MicDoorbellFd) doorbell_fds;
    unsigned n_doorbell_fds;
    MicVector vectors[MIC_NUM_VECTORS];
    unsigned n_vector_fds;
    bool irqfd_enabled;         /* MSI-X vector notifiers installed */

    /* connection */
    bool connected;
    bool peer_hello;
    bool rx_broken;
    MicMsgHdr rx_hdr;
    uint8_t rx_payload[MIC_MSG_MAX_PAYLOAD];
    uint32_t rx_have;
    bool rx_in_payload;
    uint32_t rx_type;
    uint32_t rx_size;
    int rx_fds[MIC_MSG_MAX_FDS];
    int rx_nfds;
    QEMUBH *disconnect_bh;

    /* outgoing messages the chardev has not taken yet */
    QSIMPLEQ_HEAD(, MicTxMsg) txq;
    uint32_t tx_bytes;
    guint tx_watch;
    bool tx_overflowed;         /* peer being disconnected; drop sends */

    /* guest memory table */
    MemoryListener listener;
    GArray *mem_pending;        /* MicMemRegion, built during a transaction */
    GArray *mem_table;          /* MicMemRegion, last one computed */

    bool reset_seen;
    Notifier shutdown_notifier;
    VMChangeStateEntry *vmstate_entry;
    Error *migration_blocker;
};

/* ------------------------------------------------------------------------ */
/* Sending messages */

static void mic_tx_msg_free(MicTxMsg *m)
{
    int i;

    for (i = 0; i < m->nfds; i++) {
        close(m->fds[i]);
    }
    g_free(m->buf);
    g_free(m);
}

/* Drops every queued message (the peer went away) and the write watch. */
static void mic_tx_clear(MicX100State *s)
{
    MicTxMsg *m;

    while ((m = QSIMPLEQ_FIRST(&s->txq))) {
        QSIMPLEQ_REMOVE_HEAD(&s->txq, next);
        mic_tx_msg_free(m);
    }
    s->tx_bytes = 0;
    s->tx_overflowed = false;
    if (s->tx_watch) {
        g_source_remove(s->tx_watch);
        s->tx_watch = 0;
    }
}

static gboolean mic_tx_writable(void *do_not_use, GIOCondition cond,
                                void *opaque);

/*
 * Writes queued messages until the chardev would block, then waits for its
 * write-ready watch. Never blocks: this runs on the vCPU's MMIO path, in the
 * memory listener and in reset, all under the big lock.
 */
static void mic_tx_flush(MicX100State *s)
{
    MicTxMsg *m;

    while ((m = QSIMPLEQ_FIRST(&s->txq))) {
        int r;

        if (m->off == 0 && m->nfds &&
            qemu_chr_fe_set_msgfds(&s->chr, m->fds, m->nfds) < 0) {
            trace_mic_x100_tx_fds_failed(m->type, m->nfds);
            goto done;
        }
        r = qemu_chr_fe_write(&s->chr, m->buf + m->off, m->len - m->off);
        if (r < 0 && errno == EAGAIN) {
            if (!s->tx_watch) {
                s->tx_watch = qemu_chr_fe_add_watch(&s->chr, G_IO_OUT | G_IO_HUP,
                                                    mic_tx_writable, s);
            }
            return;
        }
        if (r <= 0) {
            /* the close event takes care of the state */
            mic_tx_clear(s);
            return;
        }
        m->off += r;
        if (m->off < m->len) {
            continue;
        }
done:
        QSIMPLEQ_REMOVE_HEAD(&s->txq, next);
        s->tx_bytes -= m->len;
        mic_tx_msg_free(m);
    }
}

static gboolean mic_tx_writable(void *do_not_use, GIOCondition cond,
                                void *opaque)
{
    MicX100State *s = opaque;

    s->tx_watch = 0;
    mic_tx_flush(s);
    return G_SOURCE_REMOVE;
}

/*
 * An unmatched doorbell write identical to one still queued and unsent adds
 * nothing the host side does not learn from the first: it is coalesced.
 */
static bool mic_tx_coalesces(MicX100State *s, uint32_t type,
                             const void *payload, uint32_t size)
{
    MicTxMsg *m;

    if (type != MIC_MSG_DOORBELL) {
        return false;
    }
    QSIMPLEQ_FOREACH(m, &s->txq, next) {
        if (m->off == 0 && m->type == type &&
            m->len == sizeof(MicMsgHdr) + size &&
            !memcmp(m->buf + sizeof(MicMsgHdr), payload, size)) {
            return true;
        }
    }
    return false;
}

/*
 * Only the newest memory table matters: an unsent older one (and the fds it
 * holds) is dropped when a new one is queued.
 */
static void mic_tx_drop_unsent(MicX100State *s, uint32_t type)
{
    MicTxMsg *m, *tmp;

    QSIMPLEQ_FOREACH_SAFE(m, &s->txq, next, tmp) {
        if (m->off == 0 && m->type == type) {
            QSIMPLEQ_REMOVE(&s->txq, m, MicTxMsg, next);
            s->tx_bytes -= m->len;
            mic_tx_msg_free(m);
        }
    }
}

static void mic_send(MicX100State *s, uint32_t type, const void *payload,
                     uint32_t size, int *fds, int nfds)
{
    MicMsgHdr hdr = {
        .type = cpu_to_le32(type),
        .size = cpu_to_le32(size),
    };
    uint32_t len = sizeof(MicMsgHdr) + size;
    MicTxMsg *m;
    int i;

    if (!s->connected || s->tx_overflowed) {
        return;
    }
    if (mic_tx_coalesces(s, type, payload, size)) {
        trace_mic_x100_tx_coalesced(type);
        return;
    }
    if (type == MIC_MSG_MEM_TABLE) {
        mic_tx_drop_unsent(s, type);
    }
    if (s->tx_bytes + len > MIC_TX_QUEUE_MAX_BYTES) {
        /* the peer stopped reading: let it go, it attaches again */
        trace_mic_x100_tx_overflow(type, s->tx_bytes);
        s->tx_overflowed = true;
        qemu_bh_schedule(s->disconnect_bh);
        return;
    }
    trace_mic_x100_tx(type, size, nfds);
    m = g_new0(MicTxMsg, 1);
    m->buf = g_malloc(len);
    m->len = len;
    m->type = type;
    memcpy(m->buf, &hdr, sizeof(hdr));
    if (size) {
        memcpy(m->buf + sizeof(MicMsgHdr), payload, size);
    }
    for (i = 0; i < nfds && i < MIC_MSG_MAX_FDS; i++) {
        int fd = dup(fds[i]);

        if (fd < 0) {
            trace_mic_x100_tx_fds_failed(type, nfds);
            mic_tx_msg_free(m);
            return;
        }
        m->fds[m->nfds++] = fd;
    }
    QSIMPLEQ_INSERT_TAIL(&s->txq, m, next);
    s->tx_bytes += len;
    if (QSIMPLEQ_FIRST(&s->txq) == m) {
        mic_tx_flush(s);
    }
}

static void mic_send_card_event(MicX100State *s, uint32_t event)
{
    struct mic_msg_card_event m = { .event = cpu_to_le32(event) };

    trace_mic_x100_card_event(event);
    mic_send(s, MIC_MSG_CARD_EVENT, &m, sizeof(m), NULL, 0);
}

static void G_GNUC_PRINTF(4, 5)
mic_send_error(MicX100State *s, uint32_t request_type, int err,
               const char *fmt, ...)
{
    uint8_t buf[sizeof(struct mic_msg_error) + MIC_ERROR_TEXT_MAX];
    struct mic_msg_error head = {
        .request_type = cpu_to_le32(request_type),
        .error = cpu_to_le32(err),
    };
    g_autofree char *text = NULL;
    size_t len;
    va_list ap;

    va_start(ap, fmt);
    text = g_strdup_vprintf(fmt, ap);
    va_end(ap);
    trace_mic_x100_request_failed(request_type, err, text);
    len = MIN(strlen(text), MIC_ERROR_TEXT_MAX);
    memcpy(buf, &head, sizeof(head));
    memcpy(buf + sizeof(head), text, len);
    mic_send(s, MIC_MSG_ERROR, buf, sizeof(head) + len, NULL, 0);
}

static void mic_send_hello(MicX100State *s)
{
    struct mic_msg_device_hello m = {
        .version = cpu_to_le32(MIC_PROTO_VERSION),
        .node_id = cpu_to_le32(s->node_id),
        .aperture_size = cpu_to_le64(s->aperture_size),
        .num_spads = cpu_to_le32(MIC_NUM_SPADS),
        .num_doorbells = cpu_to_le32(MIC_NUM_DOORBELLS),
        .num_vectors = cpu_to_le32(MIC_NUM_VECTORS),
        .flags = cpu_to_le32(runstate_is_running() ?
                             MIC_HELLO_FLAG_RUNNING : 0),
        .card_state = cpu_to_le32(s->card_state),
        .shutdown_status = cpu_to_le32(s->shutdown_status),
        .host_request = cpu_to_le32(s->host_request),
    };
    int fd = memory_region_get_fd(&s->aperture);
    int i;

    for (i = 0; i < MIC_NUM_SPADS; i++) {
        m.spads[i] = cpu_to_le32(s->spad[i]);
    }
    mic_send(s, MIC_MSG_HELLO, &m, sizeof(m), &fd, 1);
}

static void mic_send_mem_table(MicX100State *s)
{
    uint8_t buf[sizeof(struct mic_msg_mem_table) +
                MIC_MAX_MEM_REGIONS * sizeof(struct mic_msg_mem_region)];
    struct mic_msg_mem_region *regions =
        (void *)(buf + sizeof(struct mic_msg_mem_table));
    int fds[MIC_MAX_MEM_REGIONS];
    unsigned i, n = MIN(s->mem_table->len, MIC_MAX_MEM_REGIONS);
    struct mic_msg_mem_table head = { .count = cpu_to_le32(n) };

    memcpy(buf, &head, sizeof(head));
    for (i = 0; i < n; i++) {
        MicMemRegion *r = &g_array_index(s->mem_table, MicMemRegion, i);

        regions[i] = (struct mic_msg_mem_region) {
            .gpa = cpu_to_le64(r->gpa),
            .size = cpu_to_le64(r->size),
            .fd_offset = cpu_to_le64(r->fd_offset),
        };
        fds[i] = r->fd;
    }
    mic_send(s, MIC_MSG_MEM_TABLE, buf,
             sizeof(head) + n * sizeof(regions[0]), fds, n);
}

/* ------------------------------------------------------------------------ */
/* Doorbell eventfds (card-to-host) */

static void mic_doorbell_fd_free(MicX100State *s, MicDoorbellFd *d)
{
    memory_region_del_eventfd(&s->mmio, MIC_REG_DOORBELL(d->doorbell), 4,
                              true, d->value, &d->notifier);
    QLIST_REMOVE(d, next);
    s->n_doorbell_fds--;
    event_notifier_cleanup(&d->notifier);
    g_free(d);
}

static MicDoorbellFd *mic_doorbell_fd_find(MicX100State *s, uint32_t doorbell,
                                           uint32_t value)
{
    MicDoorbellFd *d;

    QLIST_FOREACH(d, &s->doorbell_fds, next) {
        if (d->doorbell == doorbell && d->value == value) {
            return d;
        }
    }
    return NULL;
}

static void mic_doorbell_fds_clear(MicX100State *s)
{
    MicDoorbellFd *d, *tmp;

    if (QLIST_EMPTY(&s->doorbell_fds)) {
        return;
    }
    memory_region_transaction_begin();
    QLIST_FOREACH_SAFE(d, &s->doorbell_fds, next, tmp) {
        mic_doorbell_fd_free(s, d);
    }
    memory_region_transaction_commit();
}

/* ------------------------------------------------------------------------ */
/* Vector eventfds (host-to-card) */

static bool mic_use_irqfd(void)
{
    return kvm_msi_via_irqfd_enabled();
}

static void mic_vector_fd_handler(EventNotifier *n)
{
    MicVectorFd *vf = container_of(n, MicVectorFd, notifier);
    PCIDevice *pdev = PCI_DEVICE(vf->s);

    if (event_notifier_test_and_clear(n)) {
        msix_notify(pdev, vf->vector);
    }
}

static int mic_vector_fd_attach_irqfd(MicX100State *s, MicVectorFd *vf)
{
    MicVector *v = &s->vectors[vf->vector];
    int ret;

    if (vf->irqfd) {
        return 0;
    }
    ret = mic_irqfd_add(&vf->notifier, v->virq);
    if (ret < 0) {
        return ret;
    }
    vf->irqfd = true;
    return 0;
}

static void mic_vector_fd_detach_irqfd(MicX100State *s, MicVectorFd *vf)
{
    MicVector *v = &s->vectors[vf->vector];

    if (!vf->irqfd) {
        return;
    }
    if (mic_irqfd_remove(&vf->notifier, v->virq) < 0) {
        error_report("mic-x100: removing irqfd of vector %u failed",
                     vf->vector);
    }
    vf->irqfd = false;
}

static void mic_vector_fd_free(MicX100State *s, MicVectorFd *vf)
{
    if (mic_use_irqfd()) {
        mic_vector_fd_detach_irqfd(s, vf);
    } else {
        event_notifier_set_handler(&vf->notifier, NULL);
    }
    QLIST_REMOVE(vf, next);
    s->n_vector_fds--;
    event_notifier_cleanup(&vf->notifier);
    g_free(vf);
}

static void mic_vector_fds_clear(MicX100State *s, uint32_t vector)
{
    MicVectorFd *vf, *tmp;

    QLIST_FOREACH_SAFE(vf, &s->vectors[vector].fds, next, tmp) {
        mic_vector_fd_free(s, vf);
    }
}

static void mic_all_vector_fds_clear(MicX100State *s)
{
    uint32_t i;

    for (i = 0; i < MIC_NUM_VECTORS; i++) {
        mic_vector_fds_clear(s, i);
    }
}

static int mic_vector_unmask(PCIDevice *pdev, unsigned vector, MSIMessage msg)
{
    MicX100State *s = MIC_X100(pdev);
    MicVector *v = &s->vectors[vector];
    MicVectorFd *vf;
    int ret;

    if (v->virq < 0) {
        return -EINVAL;
    }
    ret = mic_route_update(v->virq, msg, pdev);
    if (ret < 0) {
        return ret;
    }
    mic_routes_commit();
    QLIST_FOREACH(vf, &v->fds, next) {
        ret = mic_vector_fd_attach_irqfd(s, vf);
        if (ret < 0) {
            error_report("mic-x100: irqfd for vector %u failed: %s",
                         vector, strerror(-ret));
        }
    }
    v->unmasked = true;
    return 0;
}

static void mic_vector_mask(PCIDevice *pdev, unsigned vector)
{
    MicX100State *s = MIC_X100(pdev);
    MicVector *v = &s->vectors[vector];
    MicVectorFd *vf;

    QLIST_FOREACH(vf, &v->fds, next) {
        mic_vector_fd_detach_irqfd(s, vf);
    }
    v->unmasked = false;
}

static void mic_vector_poll(PCIDevice *pdev, unsigned int vector_start,
                            unsigned int vector_end)
{
    MicX100State *s = MIC_X100(pdev);
    unsigned int vector;
    MicVectorFd *vf;

    vector_end = MIN(vector_end, MIC_NUM_VECTORS);
    for (vector = vector_start; vector < vector_end; vector++) {
        if (!msix_is_masked(pdev, vector)) {
            continue;
        }
        QLIST_FOREACH(vf, &s->vectors[vector].fds, next) {
            if (event_notifier_test_and_clear(&vf->notifier)) {
                msix_set_pending(pdev, vector);
            }
        }
    }
}

/* MSI-X was enabled under KVM with irqfd: routes plus vector notifiers. */
static void mic_enable_irqfd(MicX100State *s)
{
    PCIDevice *pdev = PCI_DEVICE(s);
    MicRouteChange c;
    uint32_t i;
    int ret;

    if (s->irqfd_enabled) {
        return;
    }
    c = mic_routes_begin();
    for (i = 0; i < MIC_NUM_VECTORS; i++) {
        ret = mic_route_add_msi(&c, i, pdev);
        if (ret < 0) {
            error_report("mic-x100: adding an MSI route failed: %s",
                         strerror(-ret));
            break;
        }
        s->vectors[i].virq = ret;
    }
    mic_routes_commit_changes(&c);
    if (i < MIC_NUM_VECTORS) {
        goto undo;
    }
    if (msix_set_vector_notifiers(pdev, mic_vector_unmask, mic_vector_mask,
                                  mic_vector_poll)) {
        error_report("mic-x100: msix_set_vector_notifiers failed");
        goto undo;
    }
    s->irqfd_enabled = true;
    return;

undo:
    for (i = 0; i < MIC_NUM_VECTORS; i++) {
        if (s->vectors[i].virq >= 0) {
            mic_route_release(s->vectors[i].virq);
            s->vectors[i].virq = -1;
        }
    }
}

static void mic_disable_irqfd(MicX100State *s)
{
    PCIDevice *pdev = PCI_DEVICE(s);
    uint32_t i;

    if (!s->irqfd_enabled) {
        return;
    }
    msix_unset_vector_notifiers(pdev);
    for (i = 0; i < MIC_NUM_VECTORS; i++) {
        /*
         * MSI-X may already be disabled, in which case the notifiers were
         * not called: keep masks and unmasks balanced here.
         */
        if (s->vectors[i].unmasked) {
            mic_vector_mask(pdev, i);
        }
        if (s->vectors[i].virq >= 0) {
            mic_route_release(s->vectors[i].virq);
            s->vectors[i].virq = -1;
        }
    }
    s->irqfd_enabled = false;
}

static void mic_write_config(PCIDevice *pdev, uint32_t address, uint32_t val,
                             int len)
{
    MicX100State *s = MIC_X100(pdev);
    bool was_enabled = msix_enabled(pdev);
    bool is_enabled;

    pci_default_write_config(pdev, address, val, len);
    is_enabled = msix_enabled(pdev);
    if (mic_use_irqfd()) {
        if (!was_enabled && is_enabled) {
            mic_enable_irqfd(s);
        } else if (was_enabled && !is_enabled) {
            mic_disable_irqfd(s);
        }
    }
}

static void mic_msix_vector_use(MicX100State *s)
{
    uint32_t i;

    for (i = 0; i < MIC_NUM_VECTORS; i++) {
        msix_vector_use(PCI_DEVICE(s), i);
    }
}

/* Drops every eventfd the host side registered. */
static void mic_drop_registrations(MicX100State *s)
{
    mic_doorbell_fds_clear(s);
    mic_all_vector_fds_clear(s);
}

/* ------------------------------------------------------------------------ */
/* BAR0 */

static bool mic_reg_is_rw(hwaddr addr)
{
    return addr == MIC_REG_CARD_STATE || addr == MIC_REG_SHUTDOWN_STATUS ||
           addr == MIC_REG_HOST_REQUEST ||
           (addr >= MIC_REG_SPAD(0) && addr < MIC_REG_SPAD(MIC_NUM_SPADS) &&
            !(addr & 3));
}

static uint32_t *mic_rw_reg(MicX100State *s, hwaddr addr)
{
    switch (addr) {
    case MIC_REG_CARD_STATE:
        return &s->card_state;
    case MIC_REG_SHUTDOWN_STATUS:
        return &s->shutdown_status;
    case MIC_REG_HOST_REQUEST:
        return &s->host_request;
    default:
        if (mic_reg_is_rw(addr)) {
            return &s->spad[(addr - MIC_REG_SPAD(0)) / 4];
        }
        return NULL;
    }
}

static uint64_t mic_mmio_read(void *opaque, hwaddr addr, unsigned size)
{
    MicX100State *s = opaque;
    uint32_t *reg;

    if (size != 4 || (addr & 3)) {
        return 0;
    }
    switch (addr) {
    case MIC_REG_MAGIC:
        return MIC_REGS_MAGIC;
    case MIC_REG_ABI_VERSION:
        return MIC_ABI_VERSION;
    case MIC_REG_FAMILY:
        return MIC_FAMILY_X100;
    case MIC_REG_STEPPING:
        return s->stepping;
    case MIC_REG_NODE_ID:
        return s->node_id;
    case MIC_REG_NUM_SPADS:
        return MIC_NUM_SPADS;
    case MIC_REG_NUM_DOORBELLS:
        return MIC_NUM_DOORBELLS;
    case MIC_REG_NUM_VECTORS:
        return MIC_NUM_VECTORS;
    case MIC_REG_APERTURE_LO:
        return (uint32_t)s->aperture_size;
    case MIC_REG_APERTURE_HI:
        return s->aperture_size >> 32;
    }
    reg = mic_rw_reg(s, addr);
    return reg ? *reg : 0;
}

static void mic_mmio_write(void *opaque, hwaddr addr, uint64_t val,
                           unsigned size)
{
    MicX100State *s = opaque;
    struct mic_msg_reg_write rw;
    uint32_t *reg;

    if (size != 4 || (addr & 3)) {
        qemu_log_mask(LOG_GUEST_ERROR,
                      "mic-x100: %u-byte write at 0x%" HWADDR_PRIx
                      " ignored\n", size, addr);
        return;
    }
    if (addr >= MIC_REG_DOORBELL(0) &&
        addr < MIC_REG_DOORBELL(MIC_NUM_DOORBELLS)) {
        /* no registered eventfd matched this write */
        struct mic_msg_doorbell m = {
            .doorbell = cpu_to_le32((addr - MIC_REG_DOORBELL(0)) / 4),
            .value = cpu_to_le32(val),
        };

        trace_mic_x100_doorbell(le32_to_cpu(m.doorbell), val);
        mic_send(s, MIC_MSG_DOORBELL, &m, sizeof(m), NULL, 0);
        return;
    }
    reg = mic_rw_reg(s, addr);
    if (!reg) {
        return;
    }
    *reg = val;
    trace_mic_x100_reg_write(addr, val);
    rw = (struct mic_msg_reg_write) {
        .offset = cpu_to_le32(addr),
        .value = cpu_to_le32(val),
    };
    mic_send(s, MIC_MSG_REG_WRITE, &rw, sizeof(rw), NULL, 0);
}

static const MemoryRegionOps mic_mmio_ops = {
    .read = mic_mmio_read,
    .write = mic_mmio_write,
    .endianness = DEVICE_LITTLE_ENDIAN,
    .valid = {
        .min_access_size = 1,
        .max_access_size = 8,
    },
    .impl = {
        .min_access_size = 1,
        .max_access_size = 8,
    },
};

/* ------------------------------------------------------------------------ */
/* Guest memory table */

static void mic_mem_begin(MemoryListener *listener)
{
    MicX100State *s = container_of(listener, MicX100State, listener);

    g_array_set_size(s->mem_pending, 0);
}

static void mic_mem_add(MemoryListener *listener,
                        MemoryRegionSection *section)
{
    MicX100State *s = container_of(listener, MicX100State, listener);
    MemoryRegion *mr = section->mr;
    MicMemRegion r;
    int fd;

    if (!memory_region_is_ram(mr) || memory_region_is_ram_device(mr) ||
        memory_region_is_rom(mr) || section->readonly || !mr->ram_block) {
        return;
    }
    fd = memory_region_get_fd(mr);
    if (fd < 0) {
        return;
    }
    r.gpa = section->offset_within_address_space;
    r.size = int128_get64(section->size);
    r.fd_offset = section->offset_within_region + mr->ram_block->fd_offset;
    r.fd = fd;
    g_array_append_val(s->mem_pending, r);
}

static gint mic_mem_cmp(gconstpointer a, gconstpointer b)
{
    const MicMemRegion *ra = a, *rb = b;

    return ra->gpa < rb->gpa ? -1 : ra->gpa > rb->gpa;
}

static void mic_mem_commit(MemoryListener *listener)
{
    MicX100State *s = container_of(listener, MicX100State, listener);
    GArray *merged = g_array_new(false, false, sizeof(MicMemRegion));
    unsigned i;

    g_array_sort(s->mem_pending, mic_mem_cmp);
    for (i = 0; i < s->mem_pending->len; i++) {
        MicMemRegion *r = &g_array_index(s->mem_pending, MicMemRegion, i);
        MicMemRegion *last = merged->len ?
            &g_array_index(merged, MicMemRegion, merged->len - 1) : NULL;

        /* pieces the memory map split out of one contiguous mapping */
        if (last && last->fd == r->fd && last->gpa + last->size == r->gpa &&
            last->fd_offset + last->size == r->fd_offset) {
            last->size += r->size;
        } else {
            g_array_append_val(merged, *r);
        }
    }
    if (merged->len == s->mem_table->len &&
        (merged->len == 0 ||
         !memcmp(merged->data, s->mem_table->data,
                 merged->len * sizeof(MicMemRegion)))) {
        g_array_free(merged, true);
        return;
    }
    if (merged->len > MIC_MAX_MEM_REGIONS) {
        warn_report("mic-x100: guest memory has %u regions, only %u are "
                    "passed to the host side", merged->len,
                    MIC_MAX_MEM_REGIONS);
    }
    g_array_free(s->mem_table, true);
    s->mem_table = merged;
    mic_send_mem_table(s);
}

/* ------------------------------------------------------------------------ */
/* Messages from the host side */

static void mic_rx_close_fds(MicX100State *s)
{
    int i;

    for (i = 0; i < s->rx_nfds; i++) {
        close(s->rx_fds[i]);
    }
    s->rx_nfds = 0;
}

static void mic_rx_reset(MicX100State *s)
{
    mic_rx_close_fds(s);
    s->rx_have = 0;
    s->rx_in_payload = false;
    s->rx_broken = false;
}

static void mic_protocol_error(MicX100State *s, const char *what)
{
    trace_mic_x100_protocol_error(what);
    s->rx_broken = true;
    mic_rx_close_fds(s);
    qemu_bh_schedule(s->disconnect_bh);
}

static void mic_disconnect_bh(void *opaque)
{
    MicX100State *s = opaque;

    qemu_chr_fe_disconnect(&s->chr);
}

/* Takes the first fd that came with the message, if any. */
static int mic_rx_take_fd(MicX100State *s)
{
    int fd;

    if (!s->rx_nfds) {
        return -1;
    }
    fd = s->rx_fds[0];
    memmove(s->rx_fds, s->rx_fds + 1, (s->rx_nfds - 1) * sizeof(int));
    s->rx_nfds--;
    return fd;
}

static bool mic_fd_is_eventfd(int fd)
{
    g_autofree char *path = g_strdup_printf("/proc/self/fd/%d", fd);
    char target[64];
    ssize_t n = readlink(path, target, sizeof(target) - 1);

    if (n < 0) {
        return fcntl(fd, F_GETFD) >= 0;  /* no /proc: accept a valid fd */
    }
    target[n] = '\0';
    return !strcmp(target, "anon_inode:[eventfd]");
}

static void mic_handle_reg_write(MicX100State *s,
                                 const struct mic_msg_reg_write *m)
{
    uint32_t offset = le32_to_cpu(m->offset), value = le32_to_cpu(m->value);
    uint32_t *reg = mic_rw_reg(s, offset);

    if (!reg) {
        mic_send_error(s, MIC_MSG_REG_WRITE, EINVAL,
                       "offset 0x%x is not a rw register", offset);
        return;
    }
    *reg = value;
}

static void mic_handle_set_doorbell_fd(MicX100State *s,
                                       const struct mic_msg_set_doorbell_fd *m)
{
    uint32_t doorbell = le32_to_cpu(m->doorbell);
    uint32_t value = le32_to_cpu(m->value);
    int fd = mic_rx_take_fd(s);
    MicDoorbellFd *d;

    if (doorbell >= MIC_NUM_DOORBELLS) {
        mic_send_error(s, MIC_MSG_SET_DOORBELL_FD, EINVAL,
                       "doorbell %u out of range (0..%u)", doorbell,
                       MIC_NUM_DOORBELLS - 1);
        goto out;
    }
    if (fd >= 0 && !mic_fd_is_eventfd(fd)) {
        mic_send_error(s, MIC_MSG_SET_DOORBELL_FD, EBADF,
                       "fd for doorbell %u is not an eventfd", doorbell);
        goto out;
    }
    d = mic_doorbell_fd_find(s, doorbell, value);
    if (fd >= 0 && !d && s->n_doorbell_fds >= MIC_MAX_DOORBELL_FDS) {
        /* each one is a KVM ioeventfd, and KVM aborts when they run out */
        mic_send_error(s, MIC_MSG_SET_DOORBELL_FD, ENOSPC,
                       "doorbell %u: %u doorbell eventfds registered already",
                       doorbell, MIC_MAX_DOORBELL_FDS);
        goto out;
    }
    memory_region_transaction_begin();
    if (d) {
        mic_doorbell_fd_free(s, d);
    }
    if (fd >= 0) {
        d = g_new0(MicDoorbellFd, 1);
        event_notifier_init_fd(&d->notifier, fd);
        fd = -1;
        d->doorbell = doorbell;
        d->value = value;
        QLIST_INSERT_HEAD(&s->doorbell_fds, d, next);
        s->n_doorbell_fds++;
        memory_region_add_eventfd(&s->mmio, MIC_REG_DOORBELL(doorbell), 4,
                                  true, value, &d->notifier);
    }
    memory_region_transaction_commit();
out:
    if (fd >= 0) {
        close(fd);
    }
}

static void mic_handle_set_vector_fd(MicX100State *s,
                                     const struct mic_msg_set_vector_fd *m)
{
    uint32_t vector = le32_to_cpu(m->vector);
    int fd = mic_rx_take_fd(s);
    MicVector *v;
    MicVectorFd *vf;

    if (vector >= MIC_NUM_VECTORS) {
        mic_send_error(s, MIC_MSG_SET_VECTOR_FD, EINVAL,
                       "vector %u out of range (0..%u)", vector,
                       MIC_NUM_VECTORS - 1);
        goto out;
    }
    v = &s->vectors[vector];
    if (fd < 0) {
        mic_vector_fds_clear(s, vector);
        return;
    }
    if (!mic_fd_is_eventfd(fd)) {
        mic_send_error(s, MIC_MSG_SET_VECTOR_FD, EBADF,
                       "fd for vector %u is not an eventfd", vector);
        goto out;
    }
    if (s->n_vector_fds >= MIC_MAX_VECTOR_FDS) {
        /* each one may be a KVM irqfd */
        mic_send_error(s, MIC_MSG_SET_VECTOR_FD, ENOSPC,
                       "vector %u: %u vector eventfds registered already",
                       vector, MIC_MAX_VECTOR_FDS);
        goto out;
    }
    vf = g_new0(MicVectorFd, 1);
    event_notifier_init_fd(&vf->notifier, fd);
    fd = -1;
    vf->s = s;
    vf->vector = vector;
    if (mic_use_irqfd()) {
        if (s->irqfd_enabled && v->unmasked) {
            int ret = mic_vector_fd_attach_irqfd(s, vf);

            if (ret < 0) {
                mic_send_error(s, MIC_MSG_SET_VECTOR_FD, -ret,
                               "irqfd for vector %u failed", vector);
                event_notifier_cleanup(&vf->notifier);
                g_free(vf);
                return;
            }
        }
    } else {
        event_notifier_set_handler(&vf->notifier, mic_vector_fd_handler);
    }
    QLIST_INSERT_HEAD(&v->fds, vf, next);
    s->n_vector_fds++;
out:
    if (fd >= 0) {
        close(fd);
    }
}

static void mic_handle_raise_vector(MicX100State *s,
                                    const struct mic_msg_raise_vector *m)
{
    uint32_t vector = le32_to_cpu(m->vector);

    if (vector >= MIC_NUM_VECTORS) {
        mic_send_error(s, MIC_MSG_RAISE_VECTOR, EINVAL,
                       "vector %u out of range (0..%u)", vector,
                       MIC_NUM_VECTORS - 1);
        return;
    }
    msix_notify(PCI_DEVICE(s), vector);
}

static uint32_t mic_msg_min_size(uint32_t type)
{
    switch (type) {
    case MIC_MSG_HELLO:
        return sizeof(struct mic_msg_host_hello);
    case MIC_MSG_RAISE_VECTOR:
        return sizeof(struct mic_msg_raise_vector);
    case MIC_MSG_REG_WRITE:
        return sizeof(struct mic_msg_reg_write);
    case MIC_MSG_SET_DOORBELL_FD:
        return sizeof(struct mic_msg_set_doorbell_fd);
    case MIC_MSG_SET_VECTOR_FD:
        return sizeof(struct mic_msg_set_vector_fd);
    case MIC_MSG_SYNC:
        return sizeof(struct mic_msg_sync);
    default:
        return 0;
    }
}

static void mic_handle_message(MicX100State *s)
{
    const uint8_t *p = s->rx_payload;
    uint32_t type = s->rx_type;

    if (s->rx_size < mic_msg_min_size(type)) {
        mic_protocol_error(s, "message payload too short");
        return;
    }
    if (!s->peer_hello && type != MIC_MSG_HELLO) {
        return;
    }
    switch (type) {
    case MIC_MSG_HELLO: {
        const struct mic_msg_host_hello *m = (const void *)p;
        uint32_t version = le32_to_cpu(m->version);

        if (MIC_VERSION_MAJOR(version) != MIC_VERSION_MAJOR(MIC_PROTO_VERSION)) {
            mic_protocol_error(s, "unsupported protocol major version");
            return;
        }
        s->peer_hello = true;
        break;
    }
    case MIC_MSG_REG_WRITE:
        mic_handle_reg_write(s, (const void *)p);
        break;
    case MIC_MSG_SET_DOORBELL_FD:
        mic_handle_set_doorbell_fd(s, (const void *)p);
        break;
    case MIC_MSG_SET_VECTOR_FD:
        mic_handle_set_vector_fd(s, (const void *)p);
        break;
    case MIC_MSG_RAISE_VECTOR:
        mic_handle_raise_vector(s, (const void *)p);
        break;
    case MIC_MSG_SYNC:
        mic_send(s, MIC_MSG_SYNC, p, sizeof(struct mic_msg_sync), NULL, 0);
        break;
    default:
        trace_mic_x100_unknown_message(type, s->rx_size);
        break;
    }
}

static int mic_chr_can_receive(void *opaque)
{
    MicX100State *s = opaque;

    /*
     * Never read past the end of the current message, so that the fds of
     * the next one arrive together with its bytes.
     */
    if (!s->rx_in_payload) {
        return sizeof(MicMsgHdr) - s->rx_have;
    }
    return s->rx_size - s->rx_have;
}

static void mic_rx_collect_fds(MicX100State *s)
{
    int fds[MIC_MSG_MAX_FDS];
    int n, i;

    n = qemu_chr_fe_get_msgfds(&s->chr, fds, MIC_MSG_MAX_FDS);
    for (i = 0; i < n; i++) {
        if (s->rx_nfds < MIC_MSG_MAX_FDS) {
            s->rx_fds[s->rx_nfds++] = fds[i];
        } else {
            close(fds[i]);
        }
    }
}

static void mic_chr_receive(void *opaque, const uint8_t *buf, int size)
{
    MicX100State *s = opaque;

    mic_rx_collect_fds(s);
    while (size > 0 && !s->rx_broken) {
        uint32_t n;

        if (!s->rx_in_payload) {
            n = MIN(size, sizeof(MicMsgHdr) - s->rx_have);
            memcpy((uint8_t *)&s->rx_hdr + s->rx_have, buf, n);
            s->rx_have += n;
            buf += n;
            size -= n;
            if (s->rx_have < sizeof(MicMsgHdr)) {
                break;
            }
            s->rx_type = le32_to_cpu(s->rx_hdr.type);
            s->rx_size = le32_to_cpu(s->rx_hdr.size);
            s->rx_have = 0;
            trace_mic_x100_rx(s->rx_type, s->rx_size);
            if (s->rx_size > MIC_MSG_MAX_PAYLOAD) {
                mic_protocol_error(s, "message larger than 4096 bytes");
                break;
            }
            s->rx_in_payload = true;
        } else {
            n = MIN(size, s->rx_size - s->rx_have);
            memcpy(s->rx_payload + s->rx_have, buf, n);
            s->rx_have += n;
            buf += n;
            size -= n;
        }
        if (s->rx_in_payload && s->rx_have == s->rx_size) {
            mic_handle_message(s);
            /* fds the message did not use */
            mic_rx_close_fds(s);
            s->rx_have = 0;
            s->rx_in_payload = false;
        }
    }
}

static void mic_chr_event(void *opaque, QEMUChrEvent event)
{
    MicX100State *s = opaque;

    switch (event) {
    case CHR_EVENT_OPENED:
        trace_mic_x100_connected();
        mic_tx_clear(s);
        mic_rx_reset(s);
        s->connected = true;
        s->peer_hello = false;
        mic_send_hello(s);
        mic_send_mem_table(s);
        break;
    case CHR_EVENT_CLOSED:
        trace_mic_x100_disconnected();
        s->connected = false;
        s->peer_hello = false;
        mic_tx_clear(s);
        mic_rx_reset(s);
        mic_drop_registrations(s);
        break;
    default:
        break;
    }
}

/* ------------------------------------------------------------------------ */
/* Power events */

static void mic_shutdown_notify(Notifier *n, void *data)
{
    MicX100State *s = container_of(n, MicX100State, shutdown_notifier);

    mic_send_card_event(s, MIC_CARD_EVENT_POWEROFF);
}

static void mic_vm_state_change(void *opaque, bool running, RunState state)
{
    MicX100State *s = opaque;

    mic_send_card_event(s, running ? MIC_CARD_EVENT_RUN : MIC_CARD_EVENT_STOP);
}

static void mic_reset(DeviceState *dev)
{
    MicX100State *s = MIC_X100(dev);

    mic_disable_irqfd(s);
    mic_drop_registrations(s);
    s->card_state = 0;
    s->host_request = 0;
    s->spad[MIC_DPLO_SPAD] = 0;
    s->spad[MIC_DPHI_SPAD] = 0;
    mic_msix_vector_use(s);
    /* the reset that completes machine creation is not a card event */
    if (s->reset_seen) {
        mic_send_card_event(s, MIC_CARD_EVENT_RESET);
    }
    s->reset_seen = true;
}

/* ------------------------------------------------------------------------ */
/* Realize */

static bool mic_check_guest_ram(Error **errp)
{
    MachineState *ms = MACHINE(qdev_get_machine());
    MemoryRegion *ram = ms->ram;

    if (!ram || memory_region_get_fd(ram) < 0 || !ram->ram_block ||
        !qemu_ram_is_shared(ram->ram_block)) {
        error_setg(errp, "mic-x100 needs guest RAM that is shared and "
                   "fd-backed: add -object memory-backend-memfd,id=mem,"
                   "size=<ram size>,share=on -machine memory-backend=mem");
        return false;
    }
    return true;
}

static void mic_realize(PCIDevice *pdev, Error **errp)
{
    MicX100State *s = MIC_X100(pdev);
    Chardev *chr = qemu_chr_fe_get_driver(&s->chr);
    int fd;

    if (!chr) {
        error_setg(errp, "mic-x100 needs chardev=<id> naming the host-side "
                   "socket (-chardev socket,id=<id>,path=<path>,server=on,"
                   "wait=off)");
        return;
    }
    if (!qemu_chr_has_feature(chr, QEMU_CHAR_FEATURE_FD_PASS)) {
        error_setg(errp, "mic-x100: chardev '%s' cannot pass file descriptors:"
                   " it must be a UNIX socket chardev", chr->label);
        return;
    }
    if (s->aperture_size < 4 * KiB || !is_power_of_2(s->aperture_size)) {
        error_setg(errp, "mic-x100: aperture-size must be a power of two of "
                   "at least 4 KiB (got %" PRIu64 ")", s->aperture_size);
        return;
    }
    if (s->node_id > UINT8_MAX) {
        error_setg(errp, "mic-x100: node-id must be at most 255 (got %u)",
                   s->node_id);
        return;
    }
    if (s->stepping != MIC_STEPPING_A0 && s->stepping != MIC_STEPPING_B0 &&
        s->stepping != MIC_STEPPING_B1 && s->stepping != MIC_STEPPING_C0) {
        error_setg(errp, "mic-x100: stepping must be 0x00 (A0), 0x10 (B0), "
                   "0x11 (B1) or 0x20 (C0) (got 0x%x)", s->stepping);
        return;
    }
    if (!mic_check_guest_ram(errp)) {
        return;
    }

    pci_config_set_revision(pdev->config, s->stepping);

    memory_region_init_io(&s->mmio, OBJECT(s), &mic_mmio_ops, s,
                          "mic-x100.regs", MIC_REGS_SIZE);
    pci_register_bar(pdev, MIC_BAR_REGS, PCI_BASE_ADDRESS_SPACE_MEMORY,
                     &s->mmio);

    fd = qemu_memfd_create("mic-x100-aperture", s->aperture_size, false, 0, 0,
                           errp);
    if (fd < 0) {
        return;
    }
    if (!memory_region_init_ram_from_fd(&s->aperture, OBJECT(s),
                                        "mic-x100.aperture", s->aperture_size,
                                        RAM_SHARED, fd, 0, errp)) {
        close(fd);
        return;
    }
    pci_register_bar(pdev, MIC_BAR_APERTURE,
                     PCI_BASE_ADDRESS_SPACE_MEMORY |
                     PCI_BASE_ADDRESS_MEM_TYPE_64 |
                     PCI_BASE_ADDRESS_MEM_PREFETCH, &s->aperture);

    if (msix_init_exclusive_bar(pdev, MIC_NUM_VECTORS, MIC_BAR_MSIX, errp)) {
        return;
    }
    mic_msix_vector_use(s);

    error_setg(&s->migration_blocker,
               "mic-x100 does not support migration: its host side holds "
               "state outside QEMU");
    if (migrate_add_blocker(&s->migration_blocker, errp) < 0) {
        msix_uninit_exclusive_bar(pdev);
        return;
    }

    s->disconnect_bh = qemu_bh_new(mic_disconnect_bh, s);
    s->mem_pending = g_array_new(false, false, sizeof(MicMemRegion));
    s->mem_table = g_array_new(false, false, sizeof(MicMemRegion));
    s->listener = (MemoryListener) {
        .name = "mic-x100",
        .begin = mic_mem_begin,
        .commit = mic_mem_commit,
        .region_add = mic_mem_add,
        .region_nop = mic_mem_add,
    };
    memory_listener_register(&s->listener, &address_space_memory);

    s->shutdown_notifier.notify = mic_shutdown_notify;
    qemu_register_shutdown_notifier(&s->shutdown_notifier);
    s->vmstate_entry = qemu_add_vm_change_state_handler(mic_vm_state_change,
                                                        s);

    qemu_chr_fe_set_handlers(&s->chr, mic_chr_can_receive, mic_chr_receive,
                             mic_chr_event, NULL, s, NULL, true);
}

static void mic_exit(PCIDevice *pdev)
{
    MicX100State *s = MIC_X100(pdev);

    qemu_chr_fe_deinit(&s->chr, false);
    s->connected = false;
    mic_tx_clear(s);
    mic_disable_irqfd(s);
    mic_drop_registrations(s);
    mic_rx_reset(s);
    if (s->vmstate_entry) {
        qemu_del_vm_change_state_handler(s->vmstate_entry);
        s->vmstate_entry = NULL;
    }
    if (s->shutdown_notifier.notify) {
        notifier_remove(&s->shutdown_notifier);
        s->shutdown_notifier.notify = NULL;
    }
    if (s->mem_table) {
        memory_listener_unregister(&s->listener);
        g_array_free(s->mem_pending, true);
        g_array_free(s->mem_table, true);
        s->mem_pending = s->mem_table = NULL;
    }
    if (s->disconnect_bh) {
        qemu_bh_delete(s->disconnect_bh);
        s->disconnect_bh = NULL;
    }
    migrate_del_blocker(&s->migration_blocker);
    msix_uninit_exclusive_bar(pdev);
}

static void mic_instance_init(Object *obj)
{
    MicX100State *s = MIC_X100(obj);
    uint32_t i;

    QLIST_INIT(&s->doorbell_fds);
    QSIMPLEQ_INIT(&s->txq);
    for (i = 0; i < MIC_NUM_VECTORS; i++) {
        QLIST_INIT(&s->vectors[i].fds);
        s->vectors[i].virq = -1;
    }
}

static const Property mic_properties[] = {
    DEFINE_PROP_CHR("chardev", MicX100State, chr),
    DEFINE_PROP_SIZE("aperture-size", MicX100State, aperture_size, 8 * MiB),
    DEFINE_PROP_UINT32("node-id", MicX100State, node_id, 1),
    DEFINE_PROP_UINT8("stepping", MicX100State, stepping, MIC_STEPPING_C0),
};

static void mic_class_init(ObjectClass *klass, MIC_CLASS_DATA data)
{
    DeviceClass *dc = DEVICE_CLASS(klass);
    PCIDeviceClass *k = PCI_DEVICE_CLASS(klass);

    k->realize = mic_realize;
    k->exit = mic_exit;
    k->config_write = mic_write_config;
    k->vendor_id = MIC_X100_PCI_VENDOR;
    k->device_id = MIC_X100_PCI_DEVICE_2250;
    k->class_id = MIC_X100_PCI_CLASS;
    dc->desc = "Intel MIC X100 coprocessor card (virtio over PCIe)";
    device_class_set_legacy_reset(dc, mic_reset);
    device_class_set_props(dc, mic_properties);
    object_class_property_set_description(klass, "chardev",
        "UNIX socket chardev of the host side (docs/device-protocol.md)");
    object_class_property_set_description(klass, "aperture-size",
        "size of the aperture BAR (host memory shared with the card), "
        "a power of two");
    object_class_property_set_description(klass, "node-id",
        "card node id, upstream convention card index + 1 (0-255)");
    object_class_property_set_description(klass, "stepping",
        "silicon stepping and PCI revision: 0x00 A0, 0x10 B0, 0x11 B1, "
        "0x20 C0");
    set_bit(DEVICE_CATEGORY_MISC, dc->categories);
}

static const TypeInfo mic_x100_types[] = {
    {
        .name = TYPE_MIC_X100,
        .parent = TYPE_PCI_DEVICE,
        .instance_size = sizeof(MicX100State),
        .instance_init = mic_instance_init,
        .class_init = mic_class_init,
        .interfaces = (InterfaceInfo[]) {
            { INTERFACE_CONVENTIONAL_PCI_DEVICE },
            { },
        },
    },
};

DEFINE_TYPES(mic_x100_types)
