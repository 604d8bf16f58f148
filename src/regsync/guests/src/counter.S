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
#
# Argument: flags (0 = none of them, the plain loop above).
#   1 COUNTER_LAPIC  each iteration also r11 = LVT LINT1 (LAPIC 0x360), so an
#                    edit of lapic.lvt_lint1 (FULL level only) is seen too.
#   2 COUNTER_TIMER  before the loop the BSP arms its LAPIC timer periodic,
#                    masked, divide by 128, initial count 0xffffffff (a period
#                    of 549 s at KVM's 1 GHz APIC bus): TMCCT counts down on
#                    its own, in the kernel, while the VMM watches.
#   4 COUNTER_SMP    the BSP copies the AP trampoline first; then, at the top
#                    of an iteration where counter_start_ap (8 bytes) is not 0,
#                    it clears it and sends INIT, SIPI, SIPI to LAPIC id 1
#                    without waiting for it (the VMM runs the vCPUs one at a
#                    time). The AP runs the same loop with its own registers
#                    (r12 from 0) and the same flags minus COUNTER_SMP and
#                    COUNTER_TIMER. counter_value/counter_xmm0 are shared: the
#                    last CPU to tick wrote them.
# NMIs (any flags): counted per CPU in counter_nmis[LAPIC id] (8 bytes each),
# then the handler returns to the loop.
        .set GUEST_SMP, 1
        .include "common.inc"

        .set COUNTER_LAPIC, 1
        .set COUNTER_TIMER, 2
        .set COUNTER_SMP, 4
        .set LVT_MASKED, 0x10000
        .set LVT_PERIODIC, 0x20000
        .set TDCR_DIV128, 0xa
        .set NMI_VECTOR, 2
        .set AP_ID, 1

        .data
        .balign 8
        .globl counter_value
counter_value:  .quad 0
        .globl counter_xmm0
counter_xmm0:   .quad 0, 0
        .globl counter_start_ap
counter_start_ap: .quad 0
        .globl counter_nmis
counter_nmis:   .space 8 * MAX_CPUS

        .text
        .globl main
main:
        ARG_OR 0                        # %rbp = flags for the whole loop
        mov $NMI_VECTOR, %ecx
        mov $counter_nmi, %eax
        call set_gate
        test $COUNTER_TIMER, %ebp
        jz 1f
        call lapic_enable
        mov $LAPIC, %eax
        movl $TDCR_DIV128, LAPIC_TDCR(%rax)
        movl $(LVT_MASKED | LVT_PERIODIC | VEC_TIMER), LAPIC_LVT_TIMER(%rax)
        movl $0xffffffff, LAPIC_TMICT(%rax)
1:      test $COUNTER_SMP, %ebp
        jz 2f
        call lapic_enable
        mov $trampoline_start, %esi     # as start_aps does, without its wait
        mov $TRAMPOLINE, %edi
        mov $(trampoline_end - trampoline_start), %ecx
        rep movsb
        mov %cr3, %rax
        mov %rax, ap_cr3
2:      xor %r12d, %r12d
        .globl counter_loop
counter_loop:
        test $COUNTER_SMP, %ebp
        jz 3f
        cmpq $0, counter_start_ap
        je 3f
        movq $0, counter_start_ap
        push %rdi                       # rsi and rdi are the VMM's to edit
        push %rsi
        mov $AP_ID, %edi
        mov $0x00004500, %esi           # INIT, level assert
        call lapic_send_ipi
        mov $(0x00004600 | (TRAMPOLINE >> 12)), %esi    # STARTUP
        call lapic_send_ipi
        call lapic_send_ipi
        pop %rsi
        pop %rdi
3:      inc %r12
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
        test $COUNTER_LAPIC, %ebp
        jz 4f
        mov $LAPIC, %eax
        mov LAPIC_LVT_LINT1(%rax), %r11d
4:
        .globl counter_tick
counter_tick:
        mov $PORT_TICK, %edx
        out %al, (%dx)
        jmp counter_loop

        .globl ap_main
ap_main:                                # %edi = LAPIC id
        call ap_signal_online
        mov boot_arg, %rbp
        and $~(COUNTER_SMP | COUNTER_TIMER), %ebp
        xor %r12d, %r12d
        jmp counter_loop

        .globl counter_nmi
counter_nmi:
        push %rax
        mov $LAPIC, %eax
        mov LAPIC_ID(%rax), %eax
        shr $24, %eax
        and $(MAX_CPUS - 1), %eax
        lock incq counter_nmis(, %rax, 8)
        pop %rax
        iretq

        .section .note.GNU-stack, "", @progbits
