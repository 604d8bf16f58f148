/* QEMU's pc-testdev (hw/misc/pc-testdev.c): the 32-bit register at 0xe0 and its
 * byte alias at 0xe8, the 64 KiB scratch memory at 0xff000000; and PCI
 * configuration space (mechanism #1, 0xcf8/0xcfc): the i440FX host bridge at
 * 00:00.0, nothing answering where no device is. */
#include "lib.h"

static u32 pci_read(u32 bus, u32 dev, u32 fn, u32 reg)
{
    outl(0xcf8, 0x80000000u | bus << 16 | dev << 11 | fn << 8 | reg);
    return inl(0xcfc);
}

static u32 run(void)
{
    outl(0xe0, 0x12345678);
    u32 v = inl(0xe0);
    u8 b1 = inb(0xe1);
    outb(0xe8 + 2, 0xab);
    u32 v2 = inl(0xe0);
    printf("testdev: port e0 %x, byte e1 %x, after byte write at ea %x\n", v, b1, v2);
    CHECK(v == 0x12345678 && b1 == 0x56 && v2 == 0x12ab5678, "testdev: port register");

    wr32(0xff000000, 0xdeadbeef);
    wr32(0xff00fffc, 0x01020304);
    u32 m0 = rd32(0xff000000), m1 = rd32(0xff00fffc);
    u8 m2 = rd8(0xff000001);
    printf("testdev: iomem %x %x byte %x\n", m0, m1, m2);
    CHECK(m0 == 0xdeadbeef && m1 == 0x01020304 && m2 == 0xbe, "testdev: iomem scratch");

    u32 id = pci_read(0, 0, 0, 0), class = pci_read(0, 0, 0, 8) >> 8;
    printf("pci: 00:00.0 %x:%x class %x\n", id & 0xffff, id >> 16, class);
    CHECK(id == 0x12378086 && class == 0x060000, "pci: host bridge %x class %x", id, class);
    u32 empty = pci_read(0, 31, 7, 0), other_bus = pci_read(1, 0, 0, 0);
    printf("pci: 00:1f.7 %x, 01:00.0 %x\n", empty, other_bus);
    CHECK(empty == 0xffffffff && other_bus == 0xffffffff, "pci: an empty slot answers");
    printf("PASS testdev\n");
    return 0;
}

u32 kmain(u32 magic, struct mb_info *mb)
{
    (void)mb;
    return booted(magic) ? run() : 1;
}
