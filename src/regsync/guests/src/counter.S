# counter -- register-test loop; never exits on its own.
#
# r12 starts at 0. Every iteration:
#   r12 += 1 and counter_value = r12
#   r13 = MSR_STAR (0xc0000081) as edx:eax
#   r14 = dr0, r15 = cr8, rbx = low 64 bits of xmm0 (counter_xmm0 = all 16 bytes)
#   tick exit (OUT to port 0x501; rdx = 0x501 there)
# so a VMM can edit r12, STAR, DR0, CR8 or XMM0 at one tick exit and see the
# guest's view of them in r12/r13/r14/r15/rbx (and counter_value) at the next.
# XMM0 goes through memory (movdqu): this host's instruction emulator, which
# runs CPL0 code, fails on movq/movd/pextrq between xmm and a GPR.
        .include "common.inc"

        .data
        .balign 8
        .globl counter_value
counter_value:  .quad 0
        .globl counter_xmm0
counter_xmm0:   .quad 0, 0

        .text
        .globl main
main:
        xor %r12d, %r12d
        .globl counter_loop
counter_loop:
        inc %r12
        mov %r12, counter_value
        mov $0xc0000081, %ecx           # MSR_STAR
        rdmsr
        shl $32, %rdx
        mov %eax, %eax
        or %rdx, %rax
        mov %rax, %r13
        mov %dr0, %r14
        mov %cr8, %r15
        movdqu %xmm0, counter_xmm0
        mov counter_xmm0, %rbx
        .globl counter_tick
counter_tick:
        mov $PORT_TICK, %edx
        out %al, (%dx)
        jmp counter_loop

        .section .note.GNU-stack, "", @progbits
