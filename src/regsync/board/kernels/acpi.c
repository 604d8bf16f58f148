/* ACPI as firmware leaves it on QEMU's pc machine: the RSDP in 0xE0000-0xFFFFF, the
 * RSDT, a FADT with the PM1 and PM timer blocks, FACS and DSDT, a MADT with every
 * vCPU's Local APIC, the IOAPIC and the ISA overrides; the PM timer counts. */
#include "lib.h"

static u32 run(u32 cpus)
{
    const u8 *rsdp = acpi_rsdp();
    CHECK(rsdp, "acpi: no RSDP with a valid checksum in 0xe0000-0xfffff");
    if (rsdp[15] >= 2)
        CHECK(checksum(rsdp, *(const u32 *)(rsdp + 20)) == 0, "acpi: RSDP extended checksum");
    printf("acpi: rsdp found\n");

    const u8 *fadt = (const u8 *)acpi_find("FACP");
    CHECK(fadt, "acpi: no FADT (or a bad checksum)");
    u32 facs = *(const u32 *)(fadt + 36), dsdt = *(const u32 *)(fadt + 40);
    u32 pm1a_evt = *(const u32 *)(fadt + 56), pm1a_cnt = *(const u32 *)(fadt + 64);
    u32 pm_tmr = *(const u32 *)(fadt + 76), gpe0 = *(const u32 *)(fadt + 80);
    printf("acpi: fadt sci %u smi_cmd %x enable %x pm1a_evt %x/%u pm1a_cnt %x/%u pm_tmr %x/%u gpe0 %x/%u\n",
           *(const u16 *)(fadt + 46), *(const u32 *)(fadt + 48), fadt[52], pm1a_evt, fadt[88],
           pm1a_cnt, fadt[89], pm_tmr, fadt[91], gpe0, fadt[92]);
    CHECK(!memcmp((const void *)facs, "FACS", 4) && facs % 64 == 0, "acpi: FACS at %x", facs);
    const struct acpi_header *d = (const struct acpi_header *)dsdt;
    CHECK(!memcmp(d->sig, "DSDT", 4) && checksum(d, d->length) == 0, "acpi: DSDT at %x", dsdt);
    printf("acpi: facs and dsdt ok\n");

    const u8 *madt = (const u8 *)acpi_find("APIC");
    CHECK(madt, "acpi: no MADT");
    u32 len = ((const struct acpi_header *)madt)->length, lapics = 0;
    printf("acpi: madt lapic %x flags %x\n", *(const u32 *)(madt + 36), *(const u32 *)(madt + 40));
    for (const u8 *e = madt + 44; e < madt + len; e += e[1]) {
        switch (e[0]) {
        case 0:
            printf("acpi: lapic uid %u id %u flags %u\n", e[2], e[3], *(const u32 *)(e + 4));
            lapics += *(const u32 *)(e + 4) & 1;
            break;
        case 1:
            printf("acpi: ioapic id %u at %x gsi %u\n", e[2], *(const u32 *)(e + 4), *(const u32 *)(e + 8));
            break;
        case 2:
            printf("acpi: override irq %u gsi %u flags %x\n", e[3], *(const u32 *)(e + 4), *(const u16 *)(e + 8));
            break;
        case 4:
            printf("acpi: lapic nmi uid %x lint %u\n", e[2], e[5]);
            break;
        default:
            printf("acpi: madt entry type %u\n", e[0]);
        }
    }
    CHECK(lapics == cpus, "acpi: %u enabled LAPICs for %u cpus", lapics, cpus);

    /* The PM timer: 24 bits at 3.579545 MHz; it must move and never run backwards
     * by less than a wrap between two close reads. */
    u32 t0 = inl((u16)pm_tmr) & 0xffffff, t1 = t0, steps = 0;
    for (int i = 0; i < 2000; i++) {
        u32 t = inl((u16)pm_tmr) & 0xffffff;
        u32 delta = (t - t1) & 0xffffff;
        CHECK(delta < 0x800000, "acpi: pm timer went back from %x to %x", t1, t);
        steps += t != t1;
        t1 = t;
    }
    printf("acpi: pm timer advances\n");
    CHECK(steps > 0, "acpi: pm timer stuck at %x", t0);
    printf("PASS acpi\n");
    return 0;
}

u32 kmain(u32 magic, struct mb_info *mb)
{
    return booted(magic) ? run(cmdline_value(mb, "cpus", 1)) : 1;
}
