/* The 16550 as drivers probe it: the divisor latch behind DLAB (the divisor must not
 * reach the wire), scratch, LSR, IER, IIR with the THR-empty interrupt, loopback. */
#include "lib.h"

static u32 run(void)
{
    outb(COM1 + 3, 0x80);                       /* DLAB = 1 */
    outb(COM1 + 0, 0x0c);                       /* divisor 12 = 9600 baud */
    outb(COM1 + 1, 0x00);
    u8 dll = inb(COM1 + 0), dlm = inb(COM1 + 1);
    outb(COM1 + 3, 0x03);                       /* DLAB = 0, 8N1 */
    serial_init();                              /* back to 115200 */
    printf("serial: divisor latch %x %x\n", dll, dlm);
    CHECK(dll == 0x0c && dlm == 0, "serial: divisor latch reads %x %x", dll, dlm);

    outb(COM1 + 7, 0x5a);
    u8 scr = inb(COM1 + 7);
    printf("serial: scratch %x\n", scr);
    CHECK(scr == 0x5a, "serial: scratch reads %x", scr);

    u8 lsr = inb(COM1 + 5);
    printf("serial: lsr %x lcr %x\n", lsr & 0x61, inb(COM1 + 3));
    CHECK((lsr & 0x60) == 0x60, "serial: transmitter not empty (lsr %x)", lsr);

    u8 iir = inb(COM1 + 2);
    printf("serial: iir idle %x\n", iir);
    CHECK((iir & 0x0f) == 0x01, "serial: an interrupt is pending with IER=0 (iir %x)", iir);
    outb(COM1 + 1, 0x02);                       /* IER: THR empty */
    u8 ier = inb(COM1 + 1);
    iir = inb(COM1 + 2);                        /* THRI pending; reading IIR clears it */
    u8 iir2 = inb(COM1 + 2);
    outb(COM1 + 1, 0x00);
    printf("serial: ier %x iir %x then %x\n", ier, iir, iir2);
    CHECK((iir & 0x0f) == 0x02 && (iir2 & 0x0f) == 0x01, "serial: THRI not reported (iir %x %x)", iir, iir2);

    outb(COM1 + 4, 0x1b);                       /* MCR: loopback */
    outb(COM1 + 0, 'Q');                        /* goes to the receiver, not the wire */
    u8 dr = inb(COM1 + 5) & 1, rx = inb(COM1 + 0);
    outb(COM1 + 4, 0x0b);
    printf("serial: loopback dr %u rx %c\n", dr, rx);
    CHECK(dr == 1 && rx == 'Q', "serial: loopback lost the byte (dr %u rx %x)", dr, rx);
    printf("PASS serial\n");
    return 0;
}

u32 kmain(u32 magic, struct mb_info *mb)
{
    (void)mb;
    return booted(magic) ? run() : 1;
}
