"""A 64 KiB firmware "ticks" guest for checkpoint tests and benchmarks (no kernel, no image).

It switches to 32-bit flat protected mode and loops forever: counter += 1; store the
counter into ``pages`` consecutive 4 KiB pages from 1 MiB on (every tick dirties exactly
those pages; with ``flush_tlb`` each store is preceded by ``invlpg``); print ``tick N``
(decimal) on COM1; spin ``delay_tsc`` TSC cycles (under TCG the guest TSC follows the
host's and stands still while the VM is stopped).

Built from this GNU as source (``as --32``, ``objcopy -O binary``); the bytes below are
its output from offset 12 (after the three parameter words) to the last instruction::

    .code16
    params:   .long pages, delay_tsc, flush          # offsets 0, 4, 8, patched per use
    gdt:      .quad 0, 0x00cf9a000000ffff, 0x00cf92000000ffff
    gdt_desc: .word 23; .long 0xffff0000 + gdt
    start:    cli; lgdtl %cs:gdt_desc
              movl %cr0,%eax; orl $1,%eax; movl %eax,%cr0
              ljmpl $0x08, $(0xffff0000 + pm32)
    .code32
    pm32:     movw $0x10,%ax; movw %ax,%ds; movw %ax,%es; movw %ax,%ss
              movl $0x80000,%esp; xorl %ebx,%ebx
    tick:     incl %ebx; movl (0xffff0000 + pages),%ecx; movl $0x100000,%edi
    dirty:    jecxz print; testl $1,(0xffff0000 + flush); jz store; invlpg (%edi)
    store:    movl %ebx,(%edi); addl $4096,%edi; decl %ecx; jmp dirty
    print:    movw $0x3f8,%dx; outb "tick " one byte at a time
              movl %ebx,%eax; movl $10,%ecx; pushl $'\\n'
    digits:   xorl %edx,%edx; divl %ecx; addl $'0',%edx; pushl %edx; testl %eax,%eax; jnz digits
              movw $0x3f8,%dx
    emit:     popl %eax; outb %al,%dx; cmpb $'\\n',%al; jne emit
              rdtsc; movl %eax,%esi
    wait:     rdtsc; subl %esi,%eax; cmpl (0xffff0000 + delay_tsc),%eax; jb wait
              jmp tick
    .org 0xfff0                                       # reset vector, still 16-bit
              jmp start
"""

import re
import struct
from pathlib import Path

_CODE = bytes.fromhex(
    "0000000000000000ffff0000009acf00ffff00000092cf0017000c00fffffa2e"
    "660f011624000f20c06683c8010f22c066ea4400ffff080066b810008ed88ec0"
    "8ed0bc0000080031db438b0d0000ffffbf00001000e31af7050800ffff010000"
    "0074030f013f891f81c70010000049ebe466baf803b074eeb069eeb063eeb06b"
    "eeb020ee89d8b90a0000006a0a31d2f7f183c2305285c075f466baf80358ee3c"
    "0a75fa0f3189c60f3129f03b050400ffff72f4eb94"
)
_RESET_JUMP = bytes.fromhex("e93700")  # jmp start (0x2a), from 0xfff0
_ROM_SIZE = 0x10000
_RESET_VECTOR = 0xFFF0
# The pages are stored from 1 MiB on; keep them below 64 MiB (the smallest test guest).
MAX_PAGES = (63 << 20) // 4096
_TICK_RE = re.compile(rb"tick (\d+)\n")


def ticker_rom(
    path: Path, *, pages: int = 16, delay_tsc: int = 200_000_000, flush_tlb: bool = False
) -> Path:
    """Write the ticker firmware to ``path``; ``pages`` dirtied per tick, ``delay_tsc`` spin,
    ``flush_tlb``: ``invlpg`` each page before storing (as a guest whose TLB churns)."""
    if not 0 <= pages <= MAX_PAGES:
        raise ValueError(f"pages {pages} outside 0..{MAX_PAGES}")
    if not 0 < delay_tsc < 1 << 32:
        raise ValueError(f"delay {delay_tsc} is not a positive 32-bit count")
    rom = bytearray(_ROM_SIZE)
    rom[0:12] = struct.pack("<III", pages, delay_tsc, int(flush_tlb))
    rom[12 : 12 + len(_CODE)] = _CODE
    rom[_RESET_VECTOR : _RESET_VECTOR + len(_RESET_JUMP)] = _RESET_JUMP
    path.write_bytes(rom)
    return path


def ticks(serial_log: Path) -> list[int]:
    """The tick numbers printed so far (complete lines only)."""
    try:
        data = serial_log.read_bytes()
    except FileNotFoundError:
        return []
    return [int(match) for match in _TICK_RE.findall(data)]
