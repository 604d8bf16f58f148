# hypercall -- N ADD hypercalls with a checksum of the answers.
#
# N = boot argument (0 = default 10000). For i = 1..N:
#   rdi = i, rsi = i*i (mod 2^64), hypercall ADD (1): rax = rdi + rsi.
#   rdi/rsi still hold i and i*i while the VMM handles the exit.
#   A wrong answer prints "hypercall: bad answer at i=0x<hex>\n", exit 1.
#   checksum = checksum * 31 + rax (mod 2^64), starting from 0.
# Then prints "hypercall: N=0x<hex> checksum=0x<16 hex digits>\n", exit 0.
# In Python:
#   c = 0
#   for i in range(1, n + 1): c = (c * 31 + i + i * i) % 2**64
        .include "common.inc"

        .set DEFAULT_N, 10000

        .bss
        .balign 8
        .globl hc_n, hc_i, hc_checksum
hc_n:           .quad 0                 # N in use
hc_i:           .quad 0                 # the i of the last completed call
hc_checksum:    .quad 0

        .text
        .globl main
main:
        ARG_OR DEFAULT_N
        mov %rbp, hc_n
        xor %r15d, %r15d                # checksum
        mov $1, %ebx                    # i
        test %rbp, %rbp
        jz 3f
        .globl hc_loop
hc_loop:
        mov %rbx, %rdi
        mov %rbx, %rsi
        imul %rsi, %rsi
        lea (%rdi,%rsi), %r12           # the expected answer
        HYPERCALL HC_ADD
        cmp %r12, %rax
        jne 2f
        imul $31, %r15, %r15
        add %rax, %r15
        mov %rbx, hc_i
        mov %r15, hc_checksum
        inc %rbx
        cmp %rbp, %rbx
        jbe hc_loop
        jmp 3f
2:      PRINT "hypercall: bad answer at i=0x"
        mov %rbx, %rax
        call put_hex
        PRINT "\n"
        mov $EXIT_FAIL, %eax
        ret
3:      PRINT "hypercall: N=0x"
        mov %rbp, %rax
        call put_hex
        PRINT " checksum=0x"
        mov %r15, %rax
        call put_hex64
        PRINT "\n"
        xor %eax, %eax
        ret

        .section .note.GNU-stack, "", @progbits
