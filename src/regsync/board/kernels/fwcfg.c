/* fw_cfg as QEMU's pc machine answers it (docs/specs/fw_cfg.rst): selector 0x510,
 * data 0x511, DMA at 0x514; the signature, id, RAM size, CPU counts, the file
 * directory and an unknown key. */
#include "lib.h"

#define FW_CTL 0x510
#define FW_DATA 0x511
#define FW_DMA 0x514

static void select(u16 key) { outw(FW_CTL, key); }
static void read_bytes(void *buf, u32 n) { u8 *p = buf; while (n--) *p++ = inb(FW_DATA); }
static u32 be32(u32 v) { return (v >> 24) | ((v >> 8) & 0xff00) | ((v << 8) & 0xff0000) | (v << 24); }
static u16 be16(u16 v) { return (u16)((v >> 8) | (v << 8)); }

static u32 read_u32(u16 key) { u32 v; select(key); read_bytes(&v, 4); return v; }

struct dma_access { u32 control, length; u64 address; } __attribute__((packed));

static u32 run(u32 nb_cpus_expected, u32 ram_mb_expected)
{
    char sig[5] = {0};
    select(0x0000);
    read_bytes(sig, 4);
    printf("fwcfg: signature %s\n", sig);
    CHECK(!memcmp(sig, "QEMU", 4), "fwcfg: no QEMU signature");

    u32 id = read_u32(0x0001);
    printf("fwcfg: id %x\n", id);
    CHECK(id & 1, "fwcfg: id %x lacks the traditional interface", id);

    u64 ram;
    select(0x0003);
    read_bytes(&ram, 8);
    printf("fwcfg: ram %u MiB\n", (u32)(ram >> 20));
    CHECK((u32)(ram >> 20) == ram_mb_expected, "fwcfg: ram size %u MiB", (u32)(ram >> 20));

    u16 nb = 0, max = 0;
    select(0x0005); read_bytes(&nb, 2);
    select(0x000f); read_bytes(&max, 2);
    printf("fwcfg: cpus %u max %u\n", nb, max);
    CHECK(nb == nb_cpus_expected && max >= nb, "fwcfg: cpus %u max %u", nb, max);

    printf("fwcfg: irq0 override %u\n", read_u32(0x8002));
    u32 unknown = read_u32(0x0018), past = read_u32(0x3ffe);
    printf("fwcfg: unset key %x, key past the table %x\n", unknown, past);
    CHECK(unknown == 0 && past == 0, "fwcfg: unknown keys read %x %x", unknown, past);

    u32 count;
    select(0x0019);
    read_bytes(&count, 4);
    count = be32(count);
    int found = 0;
    u32 e820_size = 0; u16 e820_key = 0;
    for (u32 i = 0; i < count; i++) {
        struct { u32 size; u16 select, reserved; char name[56]; } f;
        read_bytes(&f, sizeof f);
        if (!strncmp(f.name, "etc/e820", 56)) {
            found = 1;
            e820_size = be32(f.size);
            e820_key = be16(f.select);
        }
    }
    CHECK(count >= 1 && found, "fwcfg: etc/e820 not in the file directory (%u files)", count);
    select(e820_key);
    u32 ram_entries = 0, reserved_entries = 0;
    for (u32 off = 0; off + 20 <= e820_size; off += 20) {
        struct { u64 addr, len; u32 type; } __attribute__((packed)) e;
        read_bytes(&e, sizeof e);
        if (e.type == 1) {
            ram_entries++;
            printf("fwcfg: e820 ram %x +%u MiB\n", (u32)e.addr, (u32)(e.len >> 20));
        } else {
            reserved_entries++;     /* where depends on the host and the VMM: not printed */
        }
    }
    printf("fwcfg: e820 %u ram, reserved %s\n", ram_entries, reserved_entries ? "yes" : "no");
    CHECK(ram_entries == 1, "fwcfg: e820 has %u RAM entries", ram_entries);

    if (id & 2) {
        /* A big-endian register: port reads keep the string's byte order. */
        u32 hi = inl(FW_DMA), lo = inl(FW_DMA + 4);
        char dsig[9] = {0};
        memcpy(dsig, &hi, 4); memcpy(dsig + 4, &lo, 4);
        printf("fwcfg: dma signature %s\n", dsig);
        CHECK(!memcmp(dsig, "QEMU CFG", 8), "fwcfg: DMA register reads %s", dsig);
        static char buf[8];
        static struct dma_access dma;
        dma.control = be32((0x0000u << 16) | 0x08 | 0x02);   /* select signature, read */
        dma.length = be32(4);
        dma.address = (u64)be32((u32)buf) << 32;
        outl(FW_DMA, 0);
        outl(FW_DMA + 4, be32((u32)&dma));
        printf("fwcfg: dma read %s control %x\n", buf, be32(dma.control));
        CHECK(!memcmp(buf, "QEMU", 4) && dma.control == 0, "fwcfg: DMA read failed");
    }
    printf("PASS fwcfg\n");
    return 0;
}

u32 kmain(u32 magic, struct mb_info *mb)
{
    return booted(magic) ? run(cmdline_value(mb, "cpus", 1), cmdline_value(mb, "ram", 64)) : 1;
}
