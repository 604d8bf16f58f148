/* pc-testdev's IRQ-line ports (0x2000 + n) through the PIC as firmware leaves it
 * (vector bases 0x08/0x70) and through the IOAPIC (edge and level), with an IDT. */
#include "lib.h"

static volatile u32 line_to_lower;
static volatile u8 irq_uart_iir;

static void lower_and_eoi(u32 vector)
{
    if (line_to_lower == 4) {                   /* COM1: IIR read acknowledges THR empty */
        irq_uart_iir = inb(COM1 + 2);
        outb(COM1 + 1, 0);
    } else {
        outb((u16)(0x2000 + line_to_lower), 0); /* drop the line before the EOI */
    }
    if (vector >= 0x40 && vector < 0x50)
        wr32(LAPIC_BASE + 0xb0, 0);             /* LAPIC EOI */
    else {
        if (vector >= 0x70)
            outb(0xa0, 0x20);
        outb(0x20, 0x20);
    }
}

/* Raise the line with interrupts on; the handler unwinds to irq_catch (no iret). */
static u32 fire(u32 line)
{
    irq_count = 0;
    line_to_lower = line;
    u32 vector = irq_catch();
    if (vector)
        return vector;
    outb((u16)(0x2000 + line), 1);
    sti();
    for (int i = 0; i < 100000; i++)
        cpu_relax();
    cli();
    outb((u16)(0x2000 + line), 0);
    return 0;
}

static u32 run(void)
{
    idt_init();
    irq_hook = lower_and_eoi;
    u8 imr1 = inb(0x21), imr2 = inb(0xa1);
    printf("irq: pic masks %x %x elcr %x %x\n", imr1, imr2, inb(0x4d0), inb(0x4d1));

    /* The PIC as firmware programmed it: unmask IRQ 5 and IRQ 10 (+ the cascade). */
    outb(0x21, 0xff & ~(1 << 5) & ~(1 << 2));
    outb(0xa1, 0xff & ~(1 << 2));
    u32 v5 = fire(5), v10 = fire(10);
    outb(0x21, 0xff);
    outb(0xa1, 0xff);
    printf("irq: pic irq 5 -> vector %x, irq 10 -> vector %x\n", v5, v10);
    CHECK(v5 == 0x08 + 5 && v10 == 0x70 + 2, "irq: PIC vectors %x %x, not bases 0x08/0x70", v5, v10);

    /* An interrupt-driven UART: THR empty raises COM1's IRQ 4 once IER asks for it. */
    outb(0x21, 0xff & ~(1 << 4));
    line_to_lower = 4;
    irq_count = 0;
    u32 v4 = irq_catch();
    if (!v4) {
        outb(COM1 + 1, 0x02);                   /* IER: THR empty -> IRQ 4 */
        sti();
        for (int i = 0; i < 100000; i++)
            cpu_relax();
        cli();
        outb(COM1 + 1, 0);
    }
    outb(0x21, 0xff);
    printf("irq: com1 thr-empty -> vector %x, iir %x\n", v4, irq_uart_iir);
    CHECK(v4 == 0x08 + 4 && (irq_uart_iir & 0x0f) == 0x02, "irq: no COM1 interrupt (vector %x)", v4);

    /* The IOAPIC: pin 10 edge, pin 11 level, both to this CPU. */
    wr32(LAPIC_BASE + 0xf0, rd32(LAPIC_BASE + 0xf0) | 0x1ff);    /* enable, spurious 0xff */
    u32 apic_id = rd32(LAPIC_BASE + 0x20) >> 24;
    u32 ver = ioapic_read(1);
    printf("irq: ioapic version %x pins %u\n", ver & 0xff, ((ver >> 16) & 0xff) + 1);
    ioapic_write(0x10 + 2 * 10, 0x40);
    ioapic_write(0x11 + 2 * 10, apic_id << 24);
    ioapic_write(0x10 + 2 * 11, 0x41 | (1 << 15));                /* level */
    ioapic_write(0x11 + 2 * 11, apic_id << 24);
    u32 e10 = fire(10), l11 = fire(11);
    ioapic_write(0x10 + 2 * 10, 1 << 16);
    ioapic_write(0x10 + 2 * 11, 1 << 16);
    printf("irq: ioapic pin 10 -> vector %x, pin 11 (level) -> vector %x\n", e10, l11);
    CHECK(e10 == 0x40 && l11 == 0x41, "irq: IOAPIC vectors %x %x", e10, l11);
    printf("PASS irq\n");
    return 0;
}

u32 kmain(u32 magic, struct mb_info *mb)
{
    (void)mb;
    return booted(magic) ? run() : 1;
}
