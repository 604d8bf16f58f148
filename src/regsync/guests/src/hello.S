# hello -- prints "Hello from the regsync guest!\n" on the serial port, exits 0.
        .include "common.inc"

        .globl main
main:
        PRINT "Hello from the regsync guest!\n"
        xor %eax, %eax
        ret

        .section .note.GNU-stack, "", @progbits
