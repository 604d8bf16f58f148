# reset -- the fast-reset guest (snapshot tests, benchmarks/reset_loop.py).
#
# Stops at a tick exit at reset_ready: the place a harness takes its snapshot.
# Then reads its input from reset_input (written by the host after each reset):
# u64 seed, u64 k = pages to dirty (at most RESET_MAX_PAGES). For i = 0..k-1 it
# writes seed + i to the second u64 of page i of reset_area, touches rcx, rdx,
# rsi, rdi, r8-r11, leaves a checksum in rbx and in reset_result (the first u64
# of reset_area, so k = 1 dirties one guest page) and exits through the
# debug-exit port with status 0. No stack is used after reset_ready, so a run
# writes exactly max(k, 1) guest pages.
#   checksum: c = seed; for each page: c = c * 31 + (seed + i)  (mod 2^64)
        .include "common.inc"

        .set RESET_MAX_PAGES, 1024

        .data
        .balign 8
        .globl reset_input
reset_input:    .quad 0, 0              # seed, k

        # .bss.big: not zeroed by the guest at entry64 (4 MiB in the emulator would take
        # seconds); the loader's zero fill covers it.
        .section .bss.big, "aw", @nobits
        .balign 4096
        .globl reset_area, reset_result
reset_area:
reset_result:   .space RESET_MAX_PAGES * 4096

        .text
        .globl main
main:
        xor %eax, %eax
        .globl reset_ready
reset_ready:
        TICK
        mov reset_input, %rsi           # seed
        mov reset_input + 8, %rcx       # k
        cmp $RESET_MAX_PAGES, %rcx
        jbe 1f
        mov $RESET_MAX_PAGES, %ecx
1:      mov %rsi, %rax                  # checksum
        mov $reset_area, %edi
        xor %r8d, %r8d                  # i
        test %rcx, %rcx
        jz 3f
2:      lea (%rsi,%r8), %r9
        mov %r9, 8(%rdi)                # one u64 per page (offset 8: reset_result is at 0)
        imul $31, %rax, %rax
        add %r9, %rax
        add $4096, %rdi
        inc %r8
        cmp %rcx, %r8
        jb 2b
3:      mov %rax, reset_result
        mov %rax, %rbx
        mov %r8, %r10
        lea 1(%rax), %r11
        mov %eax, %edx
        xor %eax, %eax
        out %al, $PORT_EXIT             # status 0; the checksum is in rbx and reset_result
        .globl reset_done
reset_done:
        jmp reset_ready

        .section .note.GNU-stack, "", @progbits
