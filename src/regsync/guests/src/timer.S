# timer -- LAPIC one-shot timer rounds, delivered through a 64-bit IDT gate.
#
# Argument = ROUNDS (0 = default 200). xAPIC on (SVR 0x1ff), LVT timer =
# vector 0x40 one-shot, divide by 1. Each round: TMICT = 50000, then spin with
# a tick exit (port 0x501) per iteration until the handler has run, then
# SETTLE_TICKS more tick exits; a round that saw more than one interrupt is
# "doubled". The handler increments irq_count and writes EOI.
# Prints "timer: rounds=0x<hex> irqs=0x<hex> doubled=0x<hex>\n" and exits 0
# if irqs == rounds and doubled == 0, else 1. If a round gets no interrupt
# within SPIN_LIMIT iterations: "timer: lost interrupt at round 0x<hex>\n",
# exit 2.
        .include "common.inc"

        .set DEFAULT_ROUNDS, 200
        .set TIMER_COUNT, 50000         # APIC timer ticks (divide by 1)
        .set SPIN_LIMIT, 200000         # tick exits to wait for one interrupt
        .set SETTLE_TICKS, 4

        .bss
        .balign 8
        .globl irq_count, timer_round, timer_doubled, timer_spins
irq_count:      .quad 0
timer_round:    .quad 0
timer_doubled:  .quad 0
timer_spins:    .quad 0                 # spins of the current round

        .text
        .globl main
main:
        ARG_OR DEFAULT_ROUNDS
        call lapic_enable
        mov $VEC_TIMER, %ecx
        mov $timer_isr, %eax
        call set_gate
        mov $LAPIC, %r13d
        movl $0xb, LAPIC_TDCR(%r13)             # divide by 1
        movl $VEC_TIMER, LAPIC_LVT_TIMER(%r13)  # one-shot, unmasked
        sti
        xor %ebx, %ebx                  # round
        test %rbp, %rbp
        jz 6f
        .globl timer_arm
timer_arm:
        mov %rbx, timer_round
        mov irq_count, %r12             # count before this round
        movl $TIMER_COUNT, LAPIC_TMICT(%r13)
        xor %r14d, %r14d
        .globl timer_wait
timer_wait:
        TICK
        cmp irq_count, %r12
        jne 3f
        inc %r14
        mov %r14, timer_spins
        cmp $SPIN_LIMIT, %r14
        jb timer_wait
        cli
        PRINT "timer: lost interrupt at round 0x"
        mov %rbx, %rax
        call put_hex
        PRINT "\n"
        mov $EXIT_LOST_IRQ, %eax
        ret
3:      mov $SETTLE_TICKS, %ecx
4:      TICK
        dec %ecx
        jnz 4b
        mov irq_count, %rax
        sub %r12, %rax
        cmp $1, %rax
        jbe 5f
        incq timer_doubled
5:      inc %rbx
        cmp %rbp, %rbx
        jb timer_arm
6:      cli
        PRINT "timer: rounds=0x"
        mov %rbp, %rax
        call put_hex
        PRINT " irqs=0x"
        mov irq_count, %rax
        call put_hex
        PRINT " doubled=0x"
        mov timer_doubled, %rax
        call put_hex
        PRINT "\n"
        mov $EXIT_FAIL, %eax
        cmp irq_count, %rbp
        jne 7f
        cmpq $0, timer_doubled
        jne 7f
        xor %eax, %eax
7:      ret

        .globl timer_isr
timer_isr:
        lock incq irq_count
        push %rax
        mov $LAPIC, %eax
        movl $0, LAPIC_EOI(%rax)
        pop %rax
        iretq

        .section .note.GNU-stack, "", @progbits
