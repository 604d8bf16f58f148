/* -cpu host,-x2apic: the CPUID a kernel sees is KVM's, filtered the way the command
 * line says. The other bits are printed for the comparison with QEMU only: on a
 * host whose KVM passes some CPUID bits through (this one: AVX, SSE2) a filter
 * cannot remove them, under QEMU or regsync. */
#include "lib.h"

static void cpuid(u32 leaf, u32 sub, u32 *a, u32 *b, u32 *c, u32 *d)
{
    __asm__ volatile("cpuid" : "=a"(*a), "=b"(*b), "=c"(*c), "=d"(*d) : "a"(leaf), "c"(sub));
}

static u32 run(void)
{
    u32 a, b, c, d;
    cpuid(1, 0, &a, &b, &c, &d);
    u32 x2apic = (c >> 21) & 1, avx = (c >> 28) & 1, sse2 = (d >> 26) & 1, apic = (d >> 9) & 1;
    printf("cpuid: x2apic %u avx %u sse2 %u apic %u\n", x2apic, avx, sse2, apic);
    u32 apic_base_lo, apic_base_hi;
    __asm__ volatile("rdmsr" : "=a"(apic_base_lo), "=d"(apic_base_hi) : "c"(0x1b));
    printf("cpuid: apic base %x, x2apic mode %u\n", apic_base_lo & ~0xfffu, (apic_base_lo >> 10) & 1);
    CHECK(!x2apic && apic, "cpuid: -x2apic did not apply (x2apic %u apic %u)", x2apic, apic);
    printf("PASS cpuid\n");
    return 0;
}

u32 kmain(u32 magic, struct mb_info *mb)
{
    (void)mb;
    return booted(magic) ? run() : 1;
}
