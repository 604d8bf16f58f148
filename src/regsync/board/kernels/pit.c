/* The PIT's IRQ 0 reaches the IOAPIC pin the MADT's interrupt source override names
 * (GSI 2 on QEMU's pc), as firmware and QEMU route it (hw/i386/kvm/... kvm_pc_setup_irq_routing). */
#include "lib.h"

static u32 gsi_of_irq0(void)
{
    const u8 *madt = (const u8 *)acpi_find("APIC");
    if (!madt)
        return 0;
    u32 len = ((const struct acpi_header *)madt)->length;
    for (const u8 *e = madt + 44; e < madt + len; e += e[1])
        if (e[0] == 2 && e[3] == 0)
            return *(const u32 *)(e + 4);
    return 0;
}

static u32 run(void)
{
    idt_init();
    outb(0x21, 0xff);                                   /* the PIC stays out of it */
    outb(0xa1, 0xff);
    wr32(LAPIC_BASE + 0xf0, rd32(LAPIC_BASE + 0xf0) | 0x1ff);
    u32 gsi = gsi_of_irq0(), apic_id = rd32(LAPIC_BASE + 0x20) >> 24;
    printf("pit: the madt routes irq 0 to gsi %u\n", gsi);
    ioapic_write(0x10 + 2 * gsi, 0x50);                 /* edge, active high, vector 0x50 */
    ioapic_write(0x11 + 2 * gsi, apic_id << 24);
    irq_hook = 0;

    outb(0x43, 0x30);                                   /* channel 0, lo/hi, mode 0 */
    outb(0x40, 0x00);
    outb(0x40, 0x10);                                   /* 4096 counts: 3.4 ms */
    u32 vector = irq_catch();
    if (!vector) {
        /* Wait up to 200 ms of PM timer time (a bounded loop count would take
         * minutes where 32-bit code is emulated). */
        const u8 *fadt = (const u8 *)acpi_find("FACP");
        u16 port = fadt ? (u16)*(const u32 *)(fadt + 76) : 0;
        u32 last = inl(port) & 0xffffff, ticks = 0;
        sti();
        while (port && ticks < 200 * 3580) {
            u32 now = inl(port) & 0xffffff;
            ticks += (now - last) & 0xffffff;
            last = now;
        }
        cli();
    } else {
        wr32(LAPIC_BASE + 0xb0, 0);
    }
    ioapic_write(0x10 + 2 * gsi, 1 << 16);
    printf("pit: timer interrupt on vector %x\n", vector);
    CHECK(vector == 0x50, "pit: no timer interrupt through IOAPIC pin %u", gsi);
    printf("PASS pit\n");
    return 0;
}

u32 kmain(u32 magic, struct mb_info *mb)
{
    (void)mb;
    return booted(magic) ? run() : 1;
}
