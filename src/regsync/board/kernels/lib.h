/* Freestanding helpers for the conformance kernels: port I/O, COM1, exit, printing. */
#ifndef KLIB_H
#define KLIB_H

typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long long u64;
typedef unsigned int size_t;

#define COM1 0x3f8
#define DEBUG_EXIT 0xf4

static inline void outb(u16 port, u8 v) { __asm__ volatile("outb %0, %1" :: "a"(v), "Nd"(port) : "memory"); }
static inline void outw(u16 port, u16 v) { __asm__ volatile("outw %0, %1" :: "a"(v), "Nd"(port) : "memory"); }
static inline void outl(u16 port, u32 v) { __asm__ volatile("outl %0, %1" :: "a"(v), "Nd"(port) : "memory"); }
static inline u8 inb(u16 port) { u8 v; __asm__ volatile("inb %1, %0" : "=a"(v) : "Nd"(port) : "memory"); return v; }
static inline u16 inw(u16 port) { u16 v; __asm__ volatile("inw %1, %0" : "=a"(v) : "Nd"(port) : "memory"); return v; }
static inline u32 inl(u16 port) { u32 v; __asm__ volatile("inl %1, %0" : "=a"(v) : "Nd"(port) : "memory"); return v; }
static inline u32 rd32(u32 addr) { return *(volatile u32 *)addr; }
static inline void wr32(u32 addr, u32 v) { *(volatile u32 *)addr = v; }
static inline u8 rd8(u32 addr) { return *(volatile u8 *)addr; }
static inline void cpu_relax(void) { __asm__ volatile("pause" ::: "memory"); }

/* The multiboot information structure (Multiboot Specification 0.6.96, 3.3). */
struct mb_info {
    u32 flags, mem_lower, mem_upper, boot_device, cmdline, mods_count, mods_addr;
    u32 syms[4];
    u32 mmap_length, mmap_addr, drives_length, drives_addr, config_table, boot_loader_name;
};
struct mb_module { u32 mod_start, mod_end, string, reserved; };
struct mb_mmap { u32 size; u64 addr; u64 len; u32 type; } __attribute__((packed));

void serial_init(void);
void putc(char c);
void puts(const char *s);
void printf(const char *fmt, ...);
void exit_code(u32 code) __attribute__((noreturn));
int strncmp(const char *a, const char *b, size_t n);
size_t strlen(const char *s);
void *memset(void *d, int c, size_t n);
void *memcpy(void *d, const void *s, size_t n);
int memcmp(const void *a, const void *b, size_t n);
u8 checksum(const void *p, size_t n);
/* The value of "key=N" in the multiboot command line, or dflt. */
u32 cmdline_value(const struct mb_info *mb, const char *key, u32 dflt);

/* The verdict every kernel prints last: "PASS name" or "FAIL name: why". */
#define CHECK(cond, ...) do { if (!(cond)) { printf("FAIL "); printf(__VA_ARGS__); printf("\n"); return 1; } } while (0)
#define MULTIBOOT_BOOTLOADER_MAGIC 0x2BADB002

/* The common start of a test kernel's kmain: the UART ready, and whether a
   multiboot loader started us (EAX holds its magic). */
static inline int booted(u32 magic)
{
    serial_init();
    return magic == MULTIBOOT_BOOTLOADER_MAGIC;
}

#endif

/* ACPI: the table with this signature through the RSDP (0xE0000-0xFFFFF) and the RSDT,
 * 0 if absent or a checksum is wrong. */
struct acpi_header { char sig[4]; u32 length; u8 revision, checksum; char oem[6], oem_table[8]; u32 oem_rev, creator, creator_rev; } __attribute__((packed));
const struct acpi_header *acpi_find(const char *sig);
const u8 *acpi_rsdp(void);

/* Interrupts: an IDT whose 256 vectors all call irq_handler(vector). */
void idt_init(void);
u32 irq_catch(void) __attribute__((returns_twice));
extern volatile u32 irq_count, irq_last_vector;
extern void (*irq_hook)(u32 vector);
#define LAPIC_BASE 0xfee00000u
#define IOAPIC_BASE 0xfec00000u
static inline void sti(void) { __asm__ volatile("sti" ::: "memory"); }
static inline void cli(void) { __asm__ volatile("cli" ::: "memory"); }
u32 ioapic_read(u32 reg);
void ioapic_write(u32 reg, u32 v);
