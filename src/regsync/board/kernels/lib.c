/* COM1 as a polling driver would program it (8250/16550 registers, DLAB for the
 * divisor), a tiny printf, and isa-debug-exit. */
#include "lib.h"
#include <stdarg.h>

void serial_init(void)
{
    outb(COM1 + 1, 0x00);      /* IER: no interrupts */
    outb(COM1 + 3, 0x80);      /* LCR: DLAB = 1, the next two are the divisor latch */
    outb(COM1 + 0, 0x01);      /* DLL: 115200 baud */
    outb(COM1 + 1, 0x00);      /* DLM */
    outb(COM1 + 3, 0x03);      /* LCR: 8N1, DLAB = 0 */
    outb(COM1 + 2, 0xc7);      /* FCR: FIFO on, cleared */
    outb(COM1 + 4, 0x0b);      /* MCR: DTR, RTS, OUT2 */
}

void putc(char c)
{
    while (!(inb(COM1 + 5) & 0x20))   /* LSR: THR empty */
        cpu_relax();
    outb(COM1, (u8)c);
}

void puts(const char *s)
{
    while (*s)
        putc(*s++);
}

static void put_unsigned(u32 v, unsigned base, int width)
{
    char buf[12];
    int n = 0;
    do {
        buf[n++] = "0123456789abcdef"[v % base];
        v /= base;
    } while (v);
    while (n < width)
        buf[n++] = '0';
    while (n)
        putc(buf[--n]);
}

void printf(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    for (; *fmt; fmt++) {
        if (*fmt != '%') {
            putc(*fmt);
            continue;
        }
        int width = 0;
        while (fmt[1] >= '0' && fmt[1] <= '9')
            width = width * 10 + (*++fmt - '0');
        switch (*++fmt) {
        case 'u': put_unsigned(va_arg(ap, u32), 10, width); break;
        case 'd': {
            int v = va_arg(ap, int);
            if (v < 0) { putc('-'); v = -v; }
            put_unsigned((u32)v, 10, width);
            break;
        }
        case 'x': put_unsigned(va_arg(ap, u32), 16, width); break;
        case 's': puts(va_arg(ap, const char *)); break;
        case 'c': putc((char)va_arg(ap, int)); break;
        default: putc('%'); putc(*fmt); break;
        }
    }
    va_end(ap);
}

void exit_code(u32 code)
{
    outl(DEBUG_EXIT, code);     /* QEMU: status (code << 1) | 1 */
    for (;;)
        __asm__ volatile("cli; hlt");
}

size_t strlen(const char *s) { size_t n = 0; while (s[n]) n++; return n; }

int strncmp(const char *a, const char *b, size_t n)
{
    for (; n; n--, a++, b++) {
        if (*a != *b) return (u8)*a - (u8)*b;
        if (!*a) return 0;
    }
    return 0;
}

void *memset(void *d, int c, size_t n) { u8 *p = d; while (n--) *p++ = (u8)c; return d; }
void *memcpy(void *d, const void *s, size_t n) { u8 *p = d; const u8 *q = s; while (n--) *p++ = *q++; return d; }

int memcmp(const void *a, const void *b, size_t n)
{
    const u8 *p = a, *q = b;
    for (; n; n--, p++, q++)
        if (*p != *q) return *p - *q;
    return 0;
}

u8 checksum(const void *p, size_t n)
{
    u8 s = 0;
    const u8 *b = p;
    while (n--) s += *b++;
    return s;
}

u32 cmdline_value(const struct mb_info *mb, const char *key, u32 dflt)
{
    if (!(mb->flags & (1u << 2)) || !mb->cmdline)
        return dflt;
    const char *s = (const char *)mb->cmdline;
    size_t k = strlen(key);
    for (; *s; s++) {
        if ((s == (const char *)mb->cmdline || s[-1] == ' ') && !strncmp(s, key, k) && s[k] == '=') {
            u32 v = 0;
            for (s += k + 1; *s >= '0' && *s <= '9'; s++)
                v = v * 10 + (u32)(*s - '0');
            return v;
        }
    }
    return dflt;
}

const u8 *acpi_rsdp(void)
{
    for (u32 p = 0xe0000; p < 0x100000; p += 16)
        if (!memcmp((const void *)p, "RSD PTR ", 8) && checksum((const void *)p, 20) == 0)
            return (const u8 *)p;
    return 0;
}

const struct acpi_header *acpi_find(const char *sig)
{
    const u8 *rsdp = acpi_rsdp();
    if (!rsdp)
        return 0;
    const struct acpi_header *rsdt = (const struct acpi_header *)*(const u32 *)(rsdp + 16);
    if (memcmp(rsdt->sig, "RSDT", 4) || checksum(rsdt, rsdt->length))
        return 0;
    const u32 *entry = (const u32 *)(rsdt + 1);
    for (u32 i = 0; i < (rsdt->length - sizeof *rsdt) / 4; i++) {
        const struct acpi_header *t = (const struct acpi_header *)entry[i];
        if (!memcmp(t->sig, sig, 4))
            return checksum(t, t->length) ? 0 : t;
    }
    return 0;
}

/* --- interrupts ---------------------------------------------------------------- */
struct idt_entry { u16 off_lo, sel; u8 zero, type; u16 off_hi; } __attribute__((packed));
static struct idt_entry idt[256] __attribute__((aligned(16)));
static struct { u16 limit; u32 base; } __attribute__((packed)) idt_ptr;
static struct { u16 limit; u32 base; } __attribute__((packed)) gdt_ptr;
static const u64 gdt[3] __attribute__((aligned(16))) = {
    0, 0x00cf9a000000ffffull /* 0x08 code */, 0x00cf92000000ffffull /* 0x10 data */ };
extern const u32 irq_stubs[256];
volatile u32 irq_count, irq_last_vector;
void (*irq_hook)(u32 vector);

void irq_handler(u32 vector);
void irq_handler(u32 vector)
{
    irq_last_vector = vector;
    irq_count++;
    if (irq_hook)
        irq_hook(vector);
}

void idt_init(void)
{
    /* Our own GDT first: the loader's may live anywhere (multiboot spec 3.2). */
    gdt_ptr.limit = sizeof gdt - 1;
    gdt_ptr.base = (u32)gdt;
    __asm__ volatile("lgdt %0\n\tljmp $0x08, $1f\n1:\n\tmov $0x10, %%ax\n\tmov %%ax, %%ds\n\t"
                     "mov %%ax, %%es\n\tmov %%ax, %%ss\n\tmov %%ax, %%fs\n\tmov %%ax, %%gs"
                     :: "m"(gdt_ptr) : "eax", "memory");
    for (int i = 0; i < 256; i++) {
        idt[i].off_lo = irq_stubs[i] & 0xffff;
        idt[i].off_hi = irq_stubs[i] >> 16;
        idt[i].sel = 0x08;
        idt[i].zero = 0;
        idt[i].type = 0x8e;                 /* present, 32-bit interrupt gate */
    }
    idt_ptr.limit = sizeof idt - 1;
    idt_ptr.base = (u32)idt;
    __asm__ volatile("lidt %0" :: "m"(idt_ptr) : "memory");
}

u32 ioapic_read(u32 reg) { wr32(IOAPIC_BASE, reg); return rd32(IOAPIC_BASE + 0x10); }
void ioapic_write(u32 reg, u32 v) { wr32(IOAPIC_BASE, reg); wr32(IOAPIC_BASE + 0x10, v); }
