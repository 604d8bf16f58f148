/* CMOS/RTC at 0x70/0x71 as QEMU's pc fills it (hw/i386/pc.c pc_cmos_init): the
 * memory-size bytes, the CPU count, status registers; the clock runs in real time,
 * and one RTC second is 3.579545 M ticks of the ACPI PM timer (within 10%: the host is shared). */
#include "lib.h"

static u8 cmos(u8 index) { outb(0x70, index); return inb(0x71); }
static u32 cmos16(u8 index) { return cmos(index) | (u32)cmos((u8)(index + 1)) << 8; }

static u32 pm_timer(u32 port) { return inl((u16)port) & 0xffffff; }

/* Spin until the RTC's seconds register changes; the PM timer reading at that moment. */
static u32 next_second(u32 port, u32 *ticks_waited)
{
    u8 s0 = cmos(0x00);
    u32 last = pm_timer(port), waited = 0;
    while (cmos(0x00) == s0 && waited < 3 * 3579545u) {
        u32 now = pm_timer(port);
        waited += (now - last) & 0xffffff;
        last = now;
    }
    *ticks_waited = waited;
    return last;
}

static u32 run(u32 cpus, u32 ram_mb)
{
    printf("cmos: base memory %u KiB, extended %u KiB / %u KiB, above 16 MiB %u x 64 KiB\n",
           cmos16(0x15), cmos16(0x17), cmos16(0x30), cmos16(0x34));
    CHECK(cmos16(0x15) == 640, "cmos: base memory %u", cmos16(0x15));
    CHECK(cmos16(0x17) == ram_mb * 1024 - 1024, "cmos: extended memory %u KiB", cmos16(0x17));
    CHECK(cmos16(0x34) == (ram_mb - 16) * 16, "cmos: memory above 16 MiB %u", cmos16(0x34));
    printf("cmos: cpus-1 %u\n", cmos(0x5f));
    CHECK(cmos(0x5f) == cpus - 1, "cmos: byte 0x5f is %u", cmos(0x5f));
    u8 b = cmos(0x0b), d = cmos(0x0d);
    printf("cmos: status b %x (24h %u, binary %u), d %x\n", b, (b >> 1) & 1, (b >> 2) & 1, d);
    CHECK(d & 0x80, "cmos: RTC power not valid (d=%x)", d);
    u8 century = cmos(0x32), year = cmos(0x09);
    CHECK(century >= 0x20 && year <= 0x99, "cmos: century %x year %x", century, year);

    const u8 *fadt = (const u8 *)acpi_find("FACP");
    CHECK(fadt, "cmos: no FADT for the PM timer");
    u32 port = *(const u32 *)(fadt + 76), waited;
    u32 t0 = next_second(port, &waited);
    CHECK(waited < 3 * 3579545u, "cmos: the RTC's seconds did not change");
    u32 t1 = next_second(port, &waited);
    u32 ticks = (t1 - t0) & 0xffffff;
    printf("cmos: rtc runs; one second is %s of pm timer ticks\n",
           ticks > 3221000 && ticks < 3938000 ? "3.58 M (+-10%)" : "WRONG");
    CHECK(ticks > 3221000 && ticks < 3938000, "cmos: %u PM timer ticks in an RTC second", ticks);
    printf("PASS cmos\n");
    return 0;
}

u32 kmain(u32 magic, struct mb_info *mb)
{
    return booted(magic) ? run(cmdline_value(mb, "cpus", 1), cmdline_value(mb, "ram", 64)) : 1;
}
