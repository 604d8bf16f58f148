/* The AP trampoline for the smp kernel: copied to 0x8000, entered in real mode by
 * a SIPI with vector 0x08; loads a flat GDT, enters protected mode, takes a stack
 * and calls ap_main(). */
#define TRAMP 0x8000
#define AT(x) ((x) - ap_tramp_start + TRAMP)

    .text
    .code16
    .globl ap_tramp_start, ap_tramp_end
ap_tramp_start:
    cli
    xor %ax, %ax
    mov %ax, %ds
    lgdtl AT(ap_gdt_ptr)
    mov %cr0, %eax
    or $1, %eax
    mov %eax, %cr0
    ljmpl $0x08, $ap_entry32
    .align 8
ap_gdt:
    .quad 0
    .quad 0x00cf9a000000ffff    /* 0x08: flat 32-bit code */
    .quad 0x00cf92000000ffff    /* 0x10: flat data */
ap_gdt_ptr:
    .word 23
    .long AT(ap_gdt)
ap_tramp_end:

    .code32
ap_entry32:
    mov $0x10, %ax
    mov %ax, %ds
    mov %ax, %es
    mov %ax, %ss
    mov %ax, %fs
    mov %ax, %gs
    mov $1, %eax
    lock xadd %eax, ap_stack_index
    inc %eax
    shl $12, %eax
    add $ap_stacks, %eax
    mov %eax, %esp
    call ap_main
1:  cli
    hlt
    jmp 1b

    .data
    .align 4
ap_stack_index:
    .long 0
    .bss
    .align 4096
ap_stacks:
    .skip 4096 * 32
