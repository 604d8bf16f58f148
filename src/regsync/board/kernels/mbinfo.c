/* The multiboot information as QEMU's loader fills it: memory sizes, the memory map,
 * the command line, the modules (--initrd / -initrd) and the boot loader's name. */
#include "lib.h"

static u32 run(u32 magic, const struct mb_info *mb)
{
    CHECK(magic == MULTIBOOT_BOOTLOADER_MAGIC, "mbinfo: eax=%x", magic);
    printf("mbinfo: flags mem %u cmdline %u mods %u mmap %u name %u\n", mb->flags & 1,
           (mb->flags >> 2) & 1, (mb->flags >> 3) & 1, (mb->flags >> 6) & 1, (mb->flags >> 9) & 1);
    CHECK((mb->flags & 0x4d) == 0x4d, "mbinfo: flags %x lack mem/cmdline/mods/mmap", mb->flags);
    printf("mbinfo: mem_lower %u KiB mem_upper %u KiB\n", mb->mem_lower, mb->mem_upper);
    CHECK(mb->mem_lower >= 600 && mb->mem_lower <= 640, "mbinfo: mem_lower %u", mb->mem_lower);

    /* The map: available RAM in 1 MiB .. 4 GiB must cover mem_upper, nothing may
     * overlap the kernel's own image as anything but available. */
    u32 avail_above_1m = 0, entries = 0;
    for (u32 p = mb->mmap_addr; p < mb->mmap_addr + mb->mmap_length;) {
        const struct mb_mmap *e = (const struct mb_mmap *)p;
        entries++;
        if (e->type == 1 && e->addr >= 0x100000 && e->addr < 0x100000000ull)
            avail_above_1m += (u32)(e->len >> 10);
        if (e->type == 1 && e->addr == 0)
            printf("mbinfo: mmap available 0x0 +%u KiB\n", (u32)(e->len >> 10));
        if (e->type == 1 && e->addr == 0x100000)
            printf("mbinfo: mmap available 0x100000 +%u KiB\n", (u32)(e->len >> 10));
        p += e->size + 4;
    }
    printf("mbinfo: mmap available above 1 MiB %u KiB\n", avail_above_1m);
    CHECK(entries >= 2 && avail_above_1m >= mb->mem_upper, "mbinfo: map (%u entries) does not cover mem_upper", entries);

    const char *cmd = (const char *)mb->cmdline;
    printf("mbinfo: cmdline \"%s\"\n", cmd);
    CHECK(cmdline_value(mb, "answer", 0) == 42, "mbinfo: cmdline lacks answer=42");

    printf("mbinfo: %u module(s)\n", mb->mods_count);
    CHECK(mb->mods_count >= 1, "mbinfo: no module");
    const struct mb_module *mod = (const struct mb_module *)mb->mods_addr;
    for (u32 i = 0; i < mb->mods_count; i++) {
        u32 len = mod[i].mod_end - mod[i].mod_start;
        const char *data = (const char *)mod[i].mod_start;
        printf("mbinfo: module %u: %u bytes, page aligned %u, starts \"", i, len, (mod[i].mod_start & 0xfff) == 0);
        for (u32 j = 0; j < len && j < 16 && data[j] != '\n'; j++)
            putc(data[j]);
        printf("\"\n");
        CHECK(mod[i].mod_start >= 0x100000 && mod[i].mod_end >= mod[i].mod_start, "mbinfo: module %u at %x", i, mod[i].mod_start);
    }
    if (mb->flags & (1u << 9))
        printf("mbinfo: boot loader named\n");
    printf("PASS mbinfo\n");
    return 0;
}

u32 kmain(u32 magic, struct mb_info *mb)
{
    serial_init();
    return run(magic, mb);
}
