/* The trivial kernel: one line on COM1, exit code from the command line (code=N, default 0).
 * Used by the boot-time benchmark and the exit-status conformance test. */
#include "lib.h"

u32 kmain(u32 magic, struct mb_info *mb)
{
    serial_init();
    if (magic != MULTIBOOT_BOOTLOADER_MAGIC) {
        printf("FAIL hello: eax=%x, not the multiboot magic\n", magic);
        return 1;
    }
    u32 code = cmdline_value(mb, "code", 0);
    printf("hello: exiting with code %u\n", code);
    return code;
}
