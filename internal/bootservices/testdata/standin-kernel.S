# A stand-in for the agent kernel in the qemu iPXE test: a Multiboot kernel (a format iPXE
# boots; Linux's bzImage needs a real Linux) that reports on the serial port what iPXE handed
# it, then halts. Its first 512 bytes are left for an iPXE script, which the test writes:
# iPXE for UEFI boots no Multiboot kernels and runs the script instead, while iPXE for BIOS
# tries Multiboot before scripts and finds the header that follows.
#
# What the kernel prints:
#
#   ANVIL-STAND-IN kernel size=SSSSSSSS sum=CCCCCCCC     its own image, as loaded
#   ANVIL-STAND-IN cmdline <the kernel command line iPXE passed>
#   ANVIL-STAND-IN module <name> size=SSSSSSSS sum=CCCCCCCC   each initrd
#   ANVIL-STAND-IN end
#
# Sizes and sums are hexadecimal; a sum is the 32-bit sum of the bytes. The test pads the
# assembled image to a realistic size and sets load_end_addr to cover all of it, so the sum
# shows that every byte arrived.
#
# Build: as --32 -o k.o standin-kernel.S && ld -m elf_i386 -Ttext=0x100000 --oformat binary -o k.bin k.o

	.code32
	.set LOAD, 0x100000
	.set COM1, 0x3f8
	.set MAGIC, 0x1BADB002
	.set FLAGS, 0x00010003        # page-aligned modules, memory info, load addresses below
	.text
	.globl _start
_start:
script:
	.space 512                    # the test's iPXE script
header:
	.long MAGIC
	.long FLAGS
	.long -(MAGIC + FLAGS)
	.long header                  # header_addr
	.long LOAD                    # load_addr
	.long 0                       # load_end_addr: set by the test to LOAD + image size
	.long 0                       # bss_end_addr
	.long entry                   # entry_addr

entry:
	mov $0x80000, %esp
	mov %ebx, %ebp                # Multiboot information
	mov $m_kernel, %esi
	call puts
	mov $LOAD, %esi
	mov (header + 20), %ecx
	call sumrange
	call nl
	testl $4, (%ebp)              # command line present?
	jz 1f
	mov $m_cmdline, %esi
	call puts
	mov 16(%ebp), %esi
	call puts
	call nl
1:	testl $8, (%ebp)              # modules present?
	jz done
	mov 20(%ebp), %ebx            # count
	mov 24(%ebp), %edi            # first module entry
2:	test %ebx, %ebx
	jz done
	mov $m_module, %esi
	call puts
	mov 8(%edi), %esi             # its string (iPXE: the image name)
	call puts
	mov (%edi), %esi              # start
	mov 4(%edi), %ecx             # end
	call sumrange
	call nl
	add $16, %edi
	dec %ebx
	jmp 2b
done:
	mov $m_end, %esi
	call puts
3:	cli
	hlt
	jmp 3b

# sumrange prints " size=S sum=C" for the bytes from %esi up to %ecx.
sumrange:
	pusha
	mov %ecx, %edx
	sub %esi, %edx
	xor %eax, %eax
1:	cmp %ecx, %esi
	jae 2f
	movzbl (%esi), %ebx
	add %ebx, %eax
	inc %esi
	jmp 1b
2:	push %eax
	mov $m_size, %esi
	call puts
	mov %edx, %eax
	call puthex
	mov $m_sum, %esi
	call puts
	pop %eax
	call puthex
	popa
	ret

# puts writes the NUL-terminated string at %esi to COM1.
puts:
	push %eax
	push %edx
	mov $COM1, %dx
1:	lodsb
	test %al, %al
	jz 2f
	outb %al, %dx
	jmp 1b
2:	pop %edx
	pop %eax
	ret

# puthex writes %eax as eight hex digits.
puthex:
	pusha
	mov %eax, %ebx
	mov $8, %ecx
	mov $COM1, %dx
1:	rol $4, %ebx
	mov %ebx, %eax
	and $0xf, %eax
	movb hexdigits(%eax), %al
	outb %al, %dx
	loop 1b
	popa
	ret

nl:
	mov $m_nl, %esi
	jmp puts

hexdigits: .ascii "0123456789abcdef"
m_kernel:  .asciz "ANVIL-STAND-IN kernel"
m_cmdline: .asciz "ANVIL-STAND-IN cmdline "
m_module:  .asciz "ANVIL-STAND-IN module "
m_size:    .asciz " size="
m_sum:     .asciz " sum="
m_end:     .asciz "ANVIL-STAND-IN end\r\n"
m_nl:      .asciz "\r\n"
