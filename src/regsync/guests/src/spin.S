# spin -- every vCPU spins without exits; for debugger tests.
#
# The BSP starts the APs as smp does (silently; each AP calls
# ap_signal_online before it spins, and the BSP waits for that, so once
# spin_counters[0] != 0 every vCPU is in the loop). Each vCPU then runs
#   spin_loop: spin_counters[id] += 1        (8 bytes per LAPIC id)
#   spin_a:    r14 += 1                      (the same count, in a register)
#   spin_b:    test r15d (1 on the BSP, 0 on APs)
#   spin_c:    jz spin_loop                  (APs loop here)
#   spin_bsp:  call bsp_work                 (BSP only)
#   spin_d:    spin_stop == 0 ? -> spin_loop
# with rbx = &spin_counters[id] throughout. No instruction in the loop exits
# to the VMM. When a test writes a non-zero spin_stop (8 bytes) the BSP prints
# "spin: stopped\n" and exits 0 (APs keep spinning until the VMM stops).
#
# bsp_work is straight-line code for stepi tests: 19 instructions on rax,
# rcx, rdx, rsi, rdi, r8-r11 then ret; it ends with rax = 0x77 and stores it
# in bsp_work_result. Every instruction is labelled bw_0 .. bw_18 (bw_19 is
# the ret).
        .set GUEST_SMP, 1
        .include "common.inc"

        .data
        .balign 8
        .globl spin_stop, bsp_work_result
spin_stop:      .quad 0                 # set non-zero to end the guest
bsp_work_result: .quad 0

        .bss
        .balign 64
        .globl spin_counters
spin_counters:  .space 8 * MAX_CPUS

        .text
        .globl main
main:
        call start_aps
        mov $spin_counters, %ebx
        mov $1, %r15d
        xor %r14d, %r14d
        jmp spin_loop

        .globl ap_main
ap_main:                                # %edi = LAPIC id
        call ap_signal_online
        lea spin_counters(,%rdi,8), %rbx
        xor %r15d, %r15d
        xor %r14d, %r14d
        jmp spin_loop

        .balign 16
        .globl spin_loop, spin_a, spin_b, spin_c, spin_bsp, spin_d
spin_loop:
        incq (%rbx)
spin_a: inc %r14
spin_b: test %r15d, %r15d
spin_c: jz spin_loop
spin_bsp:
        call bsp_work
spin_d: cmpq $0, spin_stop
        je spin_loop
        PRINT "spin: stopped\n"
        xor %eax, %eax
        ret

        .balign 16
        .globl bsp_work, bsp_work_ret
        .globl bw_0, bw_1, bw_2, bw_3, bw_4, bw_5, bw_6, bw_7, bw_8, bw_9
        .globl bw_10, bw_11, bw_12, bw_13, bw_14, bw_15, bw_16, bw_17, bw_18, bw_19
bsp_work:
bw_0:   mov $1, %eax                    # rax = 1
bw_1:   mov $2, %ecx                    # rcx = 2
bw_2:   add %rcx, %rax                  # rax = 3
bw_3:   mov %rax, %rdx                  # rdx = 3
bw_4:   xor %esi, %esi                  # rsi = 0
bw_5:   add %rdx, %rsi                  # rsi = 3
bw_6:   mov $0x10, %edi                 # rdi = 0x10
bw_7:   add %rdi, %rsi                  # rsi = 0x13
bw_8:   xor %r8d, %r8d                  # r8 = 0
bw_9:   mov %rsi, %r8                   # r8 = 0x13
bw_10:  add %r8, %r8                    # r8 = 0x26
bw_11:  mov $0x55, %r9d                 # r9 = 0x55
bw_12:  xor %r9, %r8                    # r8 = 0x73
bw_13:  mov %r8, %r10                   # r10 = 0x73
bw_14:  add %rax, %r10                  # r10 = 0x76
bw_15:  mov %r10, %r11                  # r11 = 0x76
bw_16:  xor %rcx, %r11                  # r11 = 0x74
bw_17:  lea 3(%r11), %rax               # rax = 0x77
bw_18:  mov %rax, bsp_work_result
bsp_work_ret:
bw_19:  ret

        .section .note.GNU-stack, "", @progbits
