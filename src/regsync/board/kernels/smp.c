/* MADT-driven SMP bring-up: every enabled Local APIC in the MADT other than our own
 * gets INIT and a start-up IPI (vector 0x08: the trampoline at 0x8000) through the
 * LAPIC's ICR, and must report in with its own APIC id. */
#include "lib.h"

extern const u8 ap_tramp_start[], ap_tramp_end[];
static volatile u8 ap_seen[256];
static volatile u32 ap_count;

void ap_main(void);
void ap_main(void)
{
    u32 id = rd32(LAPIC_BASE + 0x20) >> 24;
    ap_seen[id & 0xff] = 1;
    __atomic_add_fetch(&ap_count, 1, __ATOMIC_SEQ_CST);
}

static void send_ipi(u32 apic_id, u32 low)
{
    wr32(LAPIC_BASE + 0x310, apic_id << 24);
    wr32(LAPIC_BASE + 0x300, low);
    while (rd32(LAPIC_BASE + 0x300) & (1 << 12))     /* delivery status: pending */
        cpu_relax();
}

static u32 pm_timer_port(void)
{
    const u8 *fadt = (const u8 *)acpi_find("FACP");
    return fadt ? *(const u32 *)(fadt + 76) : 0;
}

/* Wait until *flag or about `ms` milliseconds of PM timer time have passed. */
static int wait_for(volatile u8 *flag, u32 port, u32 ms)
{
    u32 ticks = 0, last = inl((u16)port) & 0xffffff, limit = ms * 3580;
    while (!*flag && ticks < limit) {
        u32 now = inl((u16)port) & 0xffffff;
        ticks += (now - last) & 0xffffff;
        last = now;
    }
    return *flag;
}

static u32 run(u32 cpus)
{
    const u8 *madt = (const u8 *)acpi_find("APIC");
    u32 port = pm_timer_port();
    CHECK(madt && port, "smp: no MADT or no PM timer");
    u32 ids[256], n = 0;
    u32 len = ((const struct acpi_header *)madt)->length;
    for (const u8 *e = madt + 44; e < madt + len; e += e[1])
        if (e[0] == 0 && (*(const u32 *)(e + 4) & 1))
            ids[n++] = e[3];
    printf("smp: the madt lists %u cpus\n", n);
    CHECK(n == cpus, "smp: %u cpus in the MADT, %u expected", n, cpus);

    u32 bsp = rd32(LAPIC_BASE + 0x20) >> 24;
    printf("smp: bsp is apic id %u\n", bsp);
    memcpy((void *)0x8000, ap_tramp_start, (size_t)(ap_tramp_end - ap_tramp_start));
    wr32(LAPIC_BASE + 0xf0, rd32(LAPIC_BASE + 0xf0) | 0x1ff);
    for (u32 i = 0; i < n; i++) {
        if (ids[i] == bsp)
            continue;
        send_ipi(ids[i], 0x4500);                  /* INIT, assert */
        send_ipi(ids[i], 0x4600 | (0x8000 >> 12)); /* start-up, vector 0x08 */
        if (!wait_for(&ap_seen[ids[i]], port, 200))
            send_ipi(ids[i], 0x4600 | (0x8000 >> 12));   /* the second SIPI of the MP spec */
        CHECK(wait_for(&ap_seen[ids[i]], port, 5000), "smp: apic id %u did not start", ids[i]);
    }
    for (u32 i = 0; i < n; i++)
        if (ids[i] != bsp)
            printf("smp: apic id %u online\n", ids[i]);
    CHECK(ap_count == n - 1, "smp: %u APs reported, %u expected", ap_count, n - 1);
    printf("PASS smp\n");
    return 0;
}

u32 kmain(u32 magic, struct mb_info *mb)
{
    return booted(magic) ? run(cmdline_value(mb, "cpus", 1)) : 1;
}
