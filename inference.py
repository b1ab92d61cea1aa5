"""Row-by-row synthesis: every flow of WaveFlow/NanoFlow inverted one row at a time.

A flow is autoregressive along height (WaveFlow, Ping et al., ICML 2020, section 3): its
inverse produces the `n_height` rows of `x [B, 1, H, W]` in order, row h from the rows
above it. Rerunning the estimator over the whole height for every row would cost H passes;
instead every residual block keeps a small convolution queue of its recent input rows, so
that a row costs one row's worth of convolutions.

That machinery lives here, apart from the modules, which hold only the network as trained:
one call of `synthesize` builds the queues and the weights folded for each flow
(`BlockQueue`, `EstimatorRows`) from the model's weights and drops them when it returns.
Nothing is written to the model, so threads may synthesize with one model at once.
The one piece of state worth keeping across calls, the CUDA graphs of lengths already
synthesized, is a `cuda_graphs.CudaGraphCache` that its owner passes in.

    x = synthesize(model, c, z)                                  # what `WaveFlow.infer` runs
    x = synthesize(model, c, z, cuda_graphs=CudaGraphCache())    # on a GPU, a cache kept across calls
"""

from __future__ import annotations

import numbers
from typing import TYPE_CHECKING

import torch

from cuda_graphs import CudaGraphCache
from modules import ResidualBlock, WaveNet2D, autocast_off

if TYPE_CHECKING:
    from model import WaveFlow

# A CPU synthesizes at most this many columns (batch x width) at once, when the batch allows: beyond, a
# row's working set falls out of the caches. Items are independent: groups give the same audio to rounding.
MAX_CPU_COLUMNS = 2**11
# The conditioning of every row is projected once per estimator when it fits this many bytes (8 per
# layer, channel and sample in fp32); past it, a CPU holds the mel rows in the queues (`conditioning_in_queue`)
# and a GPU projects each row when it is needed.
CONDITION_CACHE_BYTES = 2**31
# The filter half of every gate input is computed times this (the weights, biases and conditioning
# scaled once), so that the gate `tanh(f) * sigmoid(g) = sigmoid(g) * (1 - 2 sigmoid(-2 f))` is one
# sigmoid over the whole contiguous row and one fused multiply-add: on a CPU, tanh over the strided half
# row ran 5-8x slower than sigmoid (fp32, AVX2), a fifth of fp32 synthesis. -2 is a power of two: the
# scaled products are exact.
FILTER_SCALE = -2.0
# A queue row (3 C channels and the ones column) is padded to a multiple of this many elements, so that the
# side taps' products read an inner size of 3 C (no ones column: their bias row is zero) from 64-byte aligned
# rows: on a CPU with AMX, oneDNN's bf16 product of K = 384 ran 1.15x as fast as with K = 385, or K = 384 read
# from rows of 385, over buffers the size of a block's.
QUEUE_ROW_ALIGNMENT = 32
# In bf16 (and fp16) on a CPU, each queue row also holds the mel row (`RowMemory.mel_channels`) and the
# centre tap's product projects it with the conv (K = 3 C + cin + 1): no conditioning cache (900 MB for
# 10 s of audio) and no copy of a projected row into the gate input. On the 2-core AMX Xeon (bf16) a block
# row's gate products took 0.95 of the time at 13,781 columns and 1.03 at 1,378, and the cache had cost
# 0.48 s and 0.05 s to build. fp32 keeps the cache: with the mel in the queues 1 s took 1.02-1.03x as long.
CONDITIONING_IN_QUEUE_DTYPES = (torch.bfloat16, torch.float16)


def synthesis_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of the flows' state and audio for an estimator of `dtype`: fp32, or float64 for a float64
    model (the affine update and its noise need more than bf16's or fp16's mantissa)."""
    return torch.promote_types(dtype, torch.float32)


def scale_filter(gate: torch.Tensor) -> torch.Tensor:
    """`gate [..., 2R]` (filter channels, then gate channels) with its filter half times `FILTER_SCALE`."""
    channels = gate.shape[-1] // 2
    return torch.cat([gate[..., :channels] * FILTER_SCALE, gate[..., channels:]], dim=-1)


def condition_rows(net: WaveNet2D, c: torch.Tensor) -> torch.Tensor:
    """`net.condition(c)` laid out for row-by-row synthesis, its filter half scaled (`scale_filter`):
    `c [B, cin, H, W] -> [H, B, W, L, 2R]`."""
    batch, _, height, width = c.shape
    weight = torch.stack([block.filter_gate_conv_c.normed_weight().flatten(1).t() for block in net.res_blocks])
    weight = scale_filter(weight).permute(1, 0, 2).flatten(1)  # [L, cin, 2R] -> [cin, L * 2R]
    cond = torch.matmul(c.permute(2, 0, 3, 1), weight.to(c.dtype))  # [H, B, W, L * 2R]
    return cond.view(height, batch, width, len(net.res_blocks), -1)


def rotated_gate_weight(
    block: ResidualBlock, input_map: torch.Tensor | None, conditioning: bool = False
) -> torch.Tensor:
    """`filter_gate_conv`'s weight as a `BlockQueue`'s matrix products need it: `[3, 3, 3 C + M + 1, 2R]`.

    Entry `[turn, tap]` serves rows with `(r // dh) % 3 == turn` and width tap `tap` (0: the
    column `dw` to the left, 1: the centre, 2: `dw` to the right); its row `(2 - k) C + i` (ring
    position k, stored last to first: `BlockQueue`; queue channel i) and column o (output channel)
    hold the weight of the height tap whose row sits at ring position k. With `conditioning`, the next
    M = cin rows of the centre tap hold `filter_gate_conv_c`'s weight (the queue holds the mel row:
    `RowMemory.mel_channels`; M = 0 without). The last row (the bias) is zero here. The filter outputs
    (columns `[0, R)`) are scaled by `FILTER_SCALE`. `input_map [C, R]` is folded in as in `BlockQueue`.
    """
    weight = block.filter_gate_conv.conv.normed_weight().detach()  # [2R, R, 3 (height tap), 3 (width tap)]
    if input_map is not None:
        weight = torch.einsum("oihw,ci->ochw", weight, input_map.detach())
    weight = weight.permute(2, 3, 1, 0)  # [height tap, width tap, i, o]
    mel = block.filter_gate_conv_c.normed_weight().detach().flatten(1).t() if conditioning else None  # [cin, o]
    tail = weight.new_zeros(3, (0 if mel is None else len(mel)) + 1, weight.shape[-1])  # [width tap, M + 1, o]
    if mel is not None:
        tail[1, :-1] = mel
    # With (r // dh) % 3 == turn, ring position k holds row r - ((turn - k) % 3) * dh: height tap 2 - that.
    return scale_filter(
        torch.stack([torch.cat([*(weight[2 - (turn - k) % 3] for k in (2, 1, 0)), tail], dim=1) for turn in range(3)])
    )  # [turn, width tap, 3 C + M + 1, o]


def rotated_gate_weights(net: WaveNet2D, like: torch.Tensor, conditioning: bool = False) -> list[torch.Tensor]:
    """Every block's `rotated_gate_weight` (with `conditioning`: the mel's rows too), in the dtype and on
    the device of `like`; the first block's has `front_conv` folded in (its queue holds `[x, 1]`). Flows
    that share `net` share these: each writes only its own gate bias into them when it starts."""
    front_map = net.front_map()  # [2, R]: [x, 1] -> front_conv(x)
    return [
        rotated_gate_weight(block, front_map if j == 0 else None, conditioning).to(like)
        for j, block in enumerate(net.res_blocks)
    ]


def aligned(size: int) -> int:
    """`size` rounded up to a multiple of `QUEUE_ROW_ALIGNMENT`."""
    return -(-size // QUEUE_ROW_ALIGNMENT) * QUEUE_ROW_ALIGNMENT


def conditioning_in_queue(c: torch.Tensor, cache_fits: bool = True) -> bool:
    """Whether synthesis of `c` (upsampled mel) puts the mel rows in the queues on a CPU (in
    `CONDITIONING_IN_QUEUE_DTYPES`, or in any dtype when the conditioning cache does not fit its budget:
    `cache_fits` False) rather than projecting them once into a cache (`condition_rows`), or each row when it
    is needed (on a GPU, past the budget)."""
    return c.device.type == "cpu" and (c.dtype in CONDITIONING_IN_QUEUE_DTYPES or not cache_fits)


class RowMemory:
    """The working memory of one flow's row-by-row inverse (`EstimatorRows`), made once per synthesis and
    taken by every flow in turn: memory a process has not touched before is paged in on first use,
    which cost a CPU 3-4 ms per queue of 11 MB (10 s of audio) against 1 ms to zero it again: about 3% of
    a bf16 synthesis, by its profile, when every flow made its own.

    Per block j: `queues[j] [dh, B, W, 3 C + M + 1]` (`BlockQueue`; the first block's C = 6,
    `FirstBlockQueue`; M the mel's channels when the queues hold its row, else 0), its last column ones,
    the rest zeroed by `take`; shared: `gate_input [B, W, 2R]`, `gated [B * W, L * P]` (`EstimatorRows`),
    `share [B * W, 2]` and `log_s_t [B * W, 2]` (fp32 or better).
    """

    def __init__(self, net: WaveNet2D, batch: int, width: int, like: torch.Tensor, mel_channels: int = 0):
        """Memory for the estimators shaped as `net` (all of a model's are), rows of `batch x width`
        columns, in the dtype and on the device of `like`; `mel_channels`: the mel row's channels each queue
        row holds after its ring (`conditioning_in_queue`), or 0."""
        self.batch, self.width, self.mel_channels = batch, width, mel_channels
        channels = self.channels = net.res_channels
        layers = len(net.res_blocks)
        self.queues = []
        for j, block in enumerate(net.res_blocks):
            # The first block's queue holds [x, 1] for each of its three width taps (`FirstBlockQueue`).
            ring = 3 * (3 * net.front_map().shape[0] if j == 0 else channels)
            ones = ring + mel_channels  # the column of ones, after the ring and the mel row
            queue = like.new_zeros(block.filter_gate_conv.conv.dilation[0], batch, width, aligned(ones + 1))
            # The padding past a row's last column is zero once and for all: bf16 matrix kernels read it
            # (times zero weights; memory left uninitialised may hold NaN, which stays NaN).
            queue = queue[..., : ones + 1]  # the rest zeroed by `take`
            queue[..., ones] = 1
            self.queues.append(queue)
        self.gate_input = like.new_empty(batch, width, 2 * channels)
        self.stride = aligned(channels + 2)  # P
        gated = like.new_zeros(batch * width, layers, self.stride)
        gated[..., channels] = 1
        self.gated = gated.flatten(1)
        self.share = like.new_empty(batch * width, 2)
        # (log_s, t) is summed in fp32 (or better) whatever the estimator's precision: the flow's
        # affine update and its log-determinant need more than bf16's 8 bits of mantissa.
        self.log_s_t = like.new_empty(batch * width, 2, dtype=torch.promote_types(like.dtype, torch.float32))

    def take(self) -> RowMemory:
        """The memory for a flow, its queues empty: zero but for their ones."""
        for queue in self.queues:
            queue[..., :-1].zero_()
        return self

    def gated_columns(self, block: int, extra: int = 1) -> torch.Tensor:
        """Block `block`'s gated activation and `extra` columns after it in `gated`, the first of them ones
        (a second, zero, is `FirstBlockQueue`'s): `[B * W, R + extra]`."""
        start = block * self.stride
        return self.gated[:, start : start + self.channels + extra]


class BlockQueue:
    """One residual block of one flow, run one row at a time: its convolution queue and the flow's folded weights.

    Rows are stored column-major, `queue [dh, B, W, 3 C + 1]` (C = R channels per row):
    input row r lives in phase `r % dh`, ring position `k = (r // dh) % 3`, channels
    `[(2 - k) C, (3 - k) C)`, and the last column is ones. The three rows the causal conv reads
    for row r (r - 2 dh, r - dh, r) are then the three ring positions of one phase, one
    `[B, W, 3 C + 1]` tensor, and three matrix products against the conv weight (rotated
    to the ring's current order, the bias in the ones row), one per width tap, each on the
    columns that tap reads, add all of the 3x3 conv into the gate input.

    The ring is stored last position first so that the first two rows of a phase, whose
    earlier rows are the conv's zero padding, read only the tail of their rows: `[2 C, 3 C + 1)`
    for the first (ring position 0), `[C, 3 C + 1)` for the second. Their products skip the
    zeros, 2/3 and 1/3 of the work: a sixteenth of a flow's gate products at 16 rows and dh = 1.
    The zeros stay (`RowMemory.take`): oneDNN's bf16 products may read a row's other columns.

    With the mel row in the queue (`RowMemory.mel_channels`), it sits between the ring and the ones column,
    written for each row before its product: the centre tap's product adds the conditioning too.
    """

    def __init__(
        self,
        block: ResidualBlock,
        memory: RowMemory,
        index: int,
        gate_weight: torch.Tensor,
        gate_bias: torch.Tensor,
        residual_weight: torch.Tensor | None,
        residual_keep: float,
    ):
        """Block `index` of a flow, its queue, gate input and gated activation in `memory` (taken, its
        queues empty). The gated activation goes to `memory.gated_columns(index) [B * W, R + 1]`, whose
        last column is ones; `gate_weight` (`rotated_gate_weight`) receives this flow's `gate_bias`.
        `residual_weight [R + 1, R]` (the bias in its last row; None for the last block) and
        `residual_keep` make the next block's input `gated @ residual_weight + residual_keep * input`
        (the flow's `output_weights`)."""
        channels = block.res_channels
        batch, width = memory.batch, memory.width
        self.queue = memory.queues[index]  # [dh, B, W, 3 C + M + 1]
        dilation_h, self.shift = block.filter_gate_conv.conv.dilation
        self.ring = ring = self.queue.shape[-1] - 1 - memory.mel_channels
        # Where each phase's mel row goes: [B * W, cin], or none (the conditioning comes projected).
        self.mel_rows = (
            [self.queue[phase, ..., ring:-1].view(batch * width, -1) for phase in range(dilation_h)]
            if memory.mel_channels
            else None
        )
        # Views into the queue: [phase][ring position] -> [B * W, C].
        self.slots = [
            [
                self.queue[phase, ..., (2 - k) * ring // 3 : (3 - k) * ring // 3].view(batch * width, -1)
                for k in range(3)
            ]
            for phase in range(dilation_h)
        ]
        gate_weight[:, 1, -1] = scale_filter(gate_bias.detach())  # added with the centre width tap
        gated = self.gated = memory.gated_columns(index)
        self.residual_weight, self.keep = residual_weight, residual_keep
        # What a step touches, as views made once: a view costs microseconds per step, which add up to a
        # tenth of a short clip's synthesis on a CPU.
        gate_input = memory.gate_input  # [B, W, 2R]
        self.gate_input = gate_input.view(batch * width, -1)  # [B * W, 2R]
        self.accumulate = torch.Tensor.addmm_ if batch == 1 else torch.Tensor.baddbmm_
        self.plans = self.products(gate_input, gate_weight)
        self.filter, self.gate = self.gate_input[:, :channels], self.gate_input[:, channels:]  # [B * W, R] each
        self.gated_filter = gated[:, :channels]  # [B * W, R]

    def plan_turns(self) -> tuple[tuple[int, int], ...]:
        """`(turn, first channel read)` of each plan of a row (`products`), in the order `step` picks them:
        the three turns of the ring from channel 0, then a phase's first row (from 2 C) and its second (from C)."""
        in_channels = self.ring // 3
        return ((0, 0), (1, 0), (2, 0), (0, 2 * in_channels), (1, in_channels))

    def products(self, gate_input: torch.Tensor, gate_weight: torch.Tensor) -> list:
        """The products of a row, as views: `[phase][turn] -> (the centre tap's rows [B * W, K + 1], its weight
        [K + 1, 2R], [(gate input columns, a side tap's rows, its weight [(B,) K, 2R])])`, K = 3 C from
        channel 0 for rows with `(r // dh) % 3 == turn`, from channel 2 C (turn 3: a phase's first row) or C
        (turn 4: its second). The centre tap's product runs over all the batch's columns as one plain matrix
        product (a batched one ran oneDNN once per item, 1.25-1.45x the time in bf16); so do the side taps'
        at batch 1, and a batch's go item by item as batched products against the weight broadcast (their
        columns do not flatten); the side taps have no bias row."""
        batch, width = gate_input.shape[:2]
        flat, ring, shift = batch == 1, self.ring, self.shift
        side_input = gate_input[0] if flat else gate_input  # [(B,) W, 2R]: width second to last
        # Each side tap: (tap, the gate input's columns it adds to, the columns of the rows it reads); none
        # where the width dilation reaches past the width (the taps would read only padding).
        sides = (
            []
            if shift >= width
            else [(0, slice(shift, None), slice(None, -shift)), (2, slice(None, -shift), slice(shift, None))]
        )
        plans = []
        for rows in self.queue.unbind():  # [B, W, 3 C + 1]
            side_rows = rows[0] if flat else rows
            phase_plans = []
            for turn, start in self.plan_turns():
                taps = [tap[start:ring] if flat else tap[start:ring].expand(batch, -1, -1) for tap in gate_weight[turn]]
                side_taps = [
                    (side_input[..., out, :], side_rows[..., read, start:ring], taps[i]) for i, out, read in sides
                ]
                phase_plans.append((rows.flatten(0, 1)[:, start:], gate_weight[turn, 1, start:], side_taps))
            plans.append(phase_plans)
        return plans

    def slot(self, row: int) -> torch.Tensor:
        """Where input row `row` goes in the queue: a `[B * W, C]` view."""
        phases = len(self.slots)
        return self.slots[row % phases][(row // phases) % 3]

    def step(self, row: int, cond_row: torch.Tensor, next_slot: torch.Tensor | None) -> None:
        """Row `row` of the block, once its input row is in the queue (`slot(row)`).

        `cond_row` is the row's conditioning: its projection `[B * W, 2R]` (no bias, filter half scaled:
        `condition_rows`), or with the mel in the queue the mel row `[B * W, cin]`. The row's gated
        activation is left in `gated`, and the next block's input row is written into `next_slot [B * W, R]`.
        """
        phases = len(self.slots)
        turn = row // phases
        rows, centre, sides = self.plans[row % phases][turn % 3 if turn > 1 else turn + 3]
        # The gate input: conditioning + centre tap (with the bias), then each side tap added to the
        # columns it reaches; the products accumulate into the gate input, so no tap is ever stored apart.
        if self.mel_rows is None:
            torch.addmm(cond_row, rows, centre, out=self.gate_input)
        else:  # the mel row projected by the centre tap's product
            self.mel_rows[row % phases].copy_(cond_row)
            torch.mm(rows, centre, out=self.gate_input)
        for gate_columns, rows_read, weight in sides:
            self.accumulate(gate_columns, rows_read, weight)
        # [-2 f, g]: tanh(f) sigmoid(g) = sigmoid(g) - 2 sigmoid(-2 f) sigmoid(g) (see FILTER_SCALE).
        torch.sigmoid_(self.gate_input)
        torch.addcmul(self.gate, self.filter, self.gate, value=-2, out=self.gated_filter)
        weight = self.residual_weight
        if next_slot is not None and weight is not None:  # the last block: its gated activation is all
            self.update(row, next_slot, weight)

    def update(self, row: int, next_slot: torch.Tensor, weight: torch.Tensor) -> None:
        """The next block's input row: one product adds the residual update (`weight`, the residual weight)
        to the kept input, rounded once."""
        torch.addmm(self.slot(row), self.gated, weight, beta=self.keep, out=next_slot)


class FirstBlockQueue(BlockQueue):
    """The first block, whose input is `front_conv(x)`, affine in x: its queue holds `[x, 1]` instead (the 1
    is 0 in the conv's padding, as the input would be there), for each of the three width taps, so that
    its 3x3 conv is one product (K = 18 + 1 for the bias), `front_conv` folded into its weight;
    and its residual update adds `keep * front_conv(x)` through a column of x beside its gated activation
    (`RowMemory.gated_columns(0, 2)`), one product too. Three products a row fewer than a `BlockQueue`
    of 2 channels, each a fixed cost of tens of microseconds on a CPU however small.

    Ring position k (`BlockQueue`) holds 6 channels per column w: `[x, 1]` at columns w - dw, w and
    w + dw (`write_input`)."""

    def __init__(
        self,
        block: ResidualBlock,
        memory: RowMemory,
        gate_weight: torch.Tensor,
        gate_bias: torch.Tensor,
        residual_weight: torch.Tensor | None,
        residual_keep: float,
        input_map: torch.Tensor,
    ):
        """As `BlockQueue` (block 0), with `gate_weight` the `rotated_gate_weight` with `input_map` folded
        in, and `input_map [2, R]`: `[x, 1] -> front_conv(x)`."""
        super().__init__(block, memory, 0, gate_weight, gate_bias, residual_weight, residual_keep)
        self.columns = [[slot.view(memory.batch, memory.width, 3, 2) for slot in slots] for slots in self.slots]
        if residual_weight is not None:
            keep_input = residual_keep * input_map.detach().double()  # [2, R]: x, then 1
            bias = residual_weight[-1:].double() + keep_input[1]  # rounded once, below
            extra = [row.to(residual_weight.dtype) for row in (bias, keep_input[:1])]
            self.residual_weight = torch.cat([residual_weight[:-1], *extra])  # [R + 2, R]
            self.gated = memory.gated_columns(0, 2)  # [B * W, R + 2]: the gated activation, 1, x
            self.x_column = self.gated[:, -1]

    def products(self, gate_input: torch.Tensor, gate_weight: torch.Tensor) -> list:
        """`BlockQueue.products` with the width taps' weights side by side, as the queue holds their inputs:
        one product per row, no side taps."""
        c = self.ring // 9  # 2: [x, 1], for each width tap of each ring position
        weight = torch.stack(
            [
                torch.cat([*(w[tap, k * c : (k + 1) * c] for k in range(3) for tap in range(3)), w[1, 3 * c :]])
                for w in gate_weight  # [width tap, 3 c + M + 1, 2R] per turn, ring positions stored last to first
            ]
        )  # [turn, 9 c + M + 1, 2R]: per ring position the three width taps' [x, 1], then the mel's, the bias
        return [
            [(rows.flatten(0, 1)[:, start:], weight[turn, start:], []) for turn, start in self.plan_turns()]
            for rows in self.queue.unbind()
        ]

    def write_input(self, row: int, x: torch.Tensor) -> None:
        """Put input row `row`, `x [B, W]` (the flow's shifted input), in the queue for each width tap."""
        phases, shift = len(self.columns), min(self.shift, x.shape[-1])
        columns = self.columns[row % phases][(row // phases) % 3]  # [B, W, width tap, (x, 1)]
        if row < 3 * phases:  # the slot's first use: the side taps' padding (zeros), and the ones elsewhere
            columns[:, :shift, 0] = 0
            columns[:, columns.shape[1] - shift :, 2] = 0
            columns[:, shift:, 0, 1] = 1
            columns[:, :, 1, 1] = 1
            columns[:, : columns.shape[1] - shift, 2, 1] = 1
        columns[:, :, 1, 0] = x
        columns[:, shift:, 0, 0] = x[:, : x.shape[-1] - shift]  # the left tap of column w reads column w - shift
        columns[:, : x.shape[-1] - shift, 2, 0] = x[:, shift:]
        if self.residual_weight is not None:
            self.x_column.copy_(x.flatten())

    def update(self, row: int, next_slot: torch.Tensor, weight: torch.Tensor) -> None:
        """The next block's input row: the gated activation, its 1 and x times one matrix (`weight`)."""
        torch.mm(self.gated, weight, out=next_slot)


class EstimatorRows:
    """One flow's estimator (`WaveNet2D`), run one row at a time: a `BlockQueue` per block.

    `front_conv` is folded into the first block's queue, which holds `[x, 1]` per column. The blocks'
    shares of `(log_s, t)` are folded into one matrix product per row: every block leaves its gated
    activation in its own columns of one buffer, `gated [B * W, L * P]` (block j's `[j P, j P + R)`, a
    column of ones at `j P + R`, zeros to `P`, a multiple of `QUEUE_ROW_ALIGNMENT`), and
    `gated @ share_weight` sums them: a row's output stage of 8 blocks took 6.4 ms against 10.4 when each
    block's product had R + 2 outputs and added its share to an fp32 sum (bf16, 13,792 columns, 2-core AMX
    Xeon).
    """

    def __init__(
        self,
        net: WaveNet2D,
        memory: RowMemory,
        gate_weights: list[torch.Tensor],
        gate_biases: torch.Tensor,
        multgate: torch.Tensor | None,
        projection_weight: torch.Tensor,
        projection_bias: torch.Tensor,
    ):
        """The flow's estimator over `memory` (`RowMemory.take`: empty queues) with its folded weights:
        `gate_weights` (`rotated_gate_weights(net)`), and `gate_biases`, `multgate`, the projection as
        `net.forward` takes them."""
        weights, keep = net.output_weights(multgate, projection_weight)
        channels, layers, like = net.res_channels, len(net.res_blocks), memory.gate_input
        self.gated, self.share, self.log_s_t = memory.gated, memory.share, memory.log_s_t
        self.mel_in_queue = memory.mel_channels > 0
        # The shares' biases go to the fp32 (or better) bias; their weights are rows of one [L * P, 2] matrix.
        accumulate = self.log_s_t.dtype
        share_weight = like.new_zeros(layers, memory.stride, 2, dtype=accumulate)
        share_bias = projection_bias.detach().to(accumulate)  # [2]
        residual_weights = []
        for j, (out_weight, out_bias) in enumerate(weights):  # [R + 2, R] and [R + 2], or [2, R] and [2]
            share_weight[j, :channels] = out_weight[-2:].detach().t()
            share_bias = share_bias + out_bias[-2:].detach()
            residual = torch.cat([out_weight[:-2], out_bias[:-2, None]], dim=1).detach()  # [R, R + 1]
            residual_weights.append(residual.t().to(like.dtype) if j + 1 < layers else None)
        self.share_weight = share_weight.flatten(0, 1).to(like.dtype)  # [L * P, 2]
        self.share_bias = share_bias
        (block, gate_weight, gate_bias, residual_weight), *rest = zip(
            net.res_blocks, gate_weights, gate_biases, residual_weights, strict=True
        )
        self.first = FirstBlockQueue(block, memory, gate_weight, gate_bias, residual_weight, keep, net.front_map())
        self.blocks = [
            self.first,
            *(BlockQueue(parts[0], memory, j, *parts[1:], keep) for j, parts in enumerate(rest, 1)),
        ]

    def step(self, x_row: torch.Tensor, cond_row: torch.Tensor, row: int) -> torch.Tensor:
        """Row `row` of the flow's `(log_s, t)`; rows are fed in order 0, 1, ...

        `x_row [B, W]` is row `row` of the (already shifted) input and `cond_row` its conditioning: the
        projections `[B, W, L, 2R]` (`condition_rows`), or with the mel in the queues the mel row
        `[B, W, cin]` -> `log_s_t [B, W, 2]` in fp32 or better, valid until the next step.
        """
        blocks = self.blocks
        self.first.write_input(row, x_row)
        if self.mel_in_queue:
            conds = [cond_row.flatten(0, 1)] * len(blocks)  # L x [B * W, cin]
        else:
            conds = cond_row.flatten(0, 1).unbind(-2)  # L x [B * W, 2R]
        for j, (block, cond) in enumerate(zip(blocks, conds, strict=True)):
            block.step(row, cond, blocks[j + 1].slot(row) if j + 1 < len(blocks) else None)
        if self.log_s_t.dtype == self.gated.dtype:
            torch.addmm(self.share_bias, self.gated, self.share_weight, out=self.log_s_t)
        else:  # a bf16/fp16 estimator: the shares are summed in its product's fp32 accumulator, rounded once
            torch.add(torch.mm(self.gated, self.share_weight, out=self.share), self.share_bias, out=self.log_s_t)
        return self.log_s_t.view(*x_row.shape, 2)


def reverse_coupling(
    model: WaveFlow,
    flow: int,
    z: torch.Tensor,
    c: torch.Tensor,
    cond: torch.Tensor | None,
    rows: tuple[int, ...],
    gate_weights: list[torch.Tensor],
    memory: RowMemory,
) -> torch.Tensor:
    """Invert flow `flow`'s coupling row by row. `z [B, 1, H, W]` (`synthesis_dtype`), `c [B, cin, H, W]` and
    optionally its projection `cond [H, B, W, L, 2R]` (`condition_rows`), or with the mel in the queues
    (`RowMemory.mel_channels`) its rows `cond [H, B, W, cin]`, all of the unpermuted rows, `rows[h]`:
    the unpermuted row that is row h in this flow, `gate_weights`: the flow's estimator's
    `rotated_gate_weights`, `memory`: the estimator's (`RowMemory`, shaped for `c`) -> `x [B, 1, H, W]`
    in the flow's (permuted) row order."""
    net, coupling, embedding = model.flow_parts(flow)
    dtype = c.dtype
    batch, _, height, width = z.shape
    x = torch.empty_like(z)
    x_row = z.new_zeros(batch, width)  # the row above row 0 (shift_1d pads with zeros)
    estimator = EstimatorRows(
        net,
        memory.take(),
        gate_weights,
        net.gate_biases(embedding),
        getattr(coupling, "multgate", None),
        *coupling.proj_log_s_t.affine(),
    )
    for h in range(height):
        source = rows[h]
        cond_row = cond[source] if cond is not None else condition_rows(net, c[:, :, source : source + 1])[0]
        log_s_t = estimator.step(x_row.to(dtype), cond_row, h).to(z.dtype)  # [B, W, 2]
        x_row = (z[:, 0, h] - log_s_t[..., 1]) * torch.exp(-log_s_t[..., 0])  # [B, W]
        x[:, 0, h] = x_row
    return x


def reverse_flows(
    model: WaveFlow, c: torch.Tensor, z: torch.Tensor, condition_cache_bytes: int = CONDITION_CACHE_BYTES
) -> torch.Tensor:
    """The inverse of all flows: `c [B, cin, H, W]` (upsampled, squeezed), `z [B, 1, H, W]` -> `x [B, 1, H, W]`
    in fp32 (float64 for a float64 model: `synthesis_dtype`).

    Each estimator's projection of the conditioning and its rotated gate weights are built once,
    for all the consecutive flows that share it; the estimators' working memory once for all. Where the
    queues hold the mel rows (`conditioning_in_queue`) there is no projection to build (nor its budget,
    `condition_cache_bytes`, to keep).
    """
    config = model.config
    x = z.to(synthesis_dtype(c.dtype))
    cache_bytes = c.numel() // config.cin_channels * config.n_layer * 2 * config.res_channels * c.element_size()
    cache_fits = cache_bytes <= condition_cache_bytes
    mel_in_queue = conditioning_in_queue(c, cache_fits)
    memory = RowMemory(model.flow_parts(0)[0], c.shape[0], c.shape[-1], c, c.shape[1] if mel_in_queue else 0)
    cache = cache_fits and not mel_in_queue
    weights_net, gate_weights, cond_net = None, [], None
    cond = c.permute(2, 0, 3, 1).contiguous() if mel_in_queue else None  # [H, B, W, cin]
    for flow in reversed(range(config.n_flow)):
        net = model.flow_parts(flow)[0]
        if net is not weights_net:
            weights_net, gate_weights = net, rotated_gate_weights(net, c, mel_in_queue)
        if cache and net is not cond_net:
            cond_net, cond = net, condition_rows(net, c)  # [H, B, W, L, 2R]
        x = model.permute(flow, reverse_coupling(model, flow, x, c, cond, model.row_orders[flow], gate_weights, memory))
    return x


@torch.no_grad()
def synthesize(
    model: WaveFlow,
    c: torch.Tensor,
    z: torch.Tensor,
    max_cpu_columns: int = MAX_CPU_COLUMNS,
    condition_cache_bytes: int = CONDITION_CACHE_BYTES,
    cuda_graphs: CudaGraphCache | None = None,
) -> torch.Tensor:
    """`reverse_flows` with its options: `c [B, cin, H, W]` (upsampled, squeezed; taken in the model's dtype,
    autocast or not),
    `z [B, 1, H, W]` -> `x [B, 1, H, W]` (fp32, float64 for a float64 model: `synthesis_dtype`).

    `max_cpu_columns`: on a CPU the batch goes in groups of at most this many columns (at least one
    item each); `condition_cache_bytes`: the budget for projecting the conditioning of all rows at
    once (past it, or at 0: the mel rows in the queues on a CPU, each row projected when it is needed on a
    GPU; no projection is built where the queues hold the mel rows, `conditioning_in_queue`);
    `cuda_graphs`: on a GPU, replay captured graphs from this cache (`CudaGraphCache`) instead of
    launching every kernel (ignored elsewhere). None of them changes the result beyond rounding: a product
    over a group of items may sum in another order than one over each item (oneDNN blocks them
    differently), and the mel projected in the queues' products another than apart: in fp32 about 1e-6 on
    tiny random models, up to 5e-5 on a trained one over a long clip (as far as fp32 is from float64; see
    docs/precision.md).
    """

    options = (("max_cpu_columns", max_cpu_columns, 1), ("condition_cache_bytes", condition_cache_bytes, 0))
    for name, value, least in options:
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < least:
            raise ValueError(f"{name} must be a whole number >= {least}, got {value!r}")

    def run(c: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return reverse_flows(model, c, z, condition_cache_bytes)

    # The model's dtype is synthesis's precision: under a caller's autocast the products would take another
    # (the conditioning's projection bf16, the queues' `out=` products not), and the upsampler's fp32 output stays.
    with autocast_off(c.device):
        c = c.to(next(model.parameters()).dtype)
        if cuda_graphs is not None and c.device.type == "cuda":
            weights = tuple((p.data_ptr(), p._version, p.dtype) for p in model.parameters())
            return cuda_graphs(run, (c, z), (weights, condition_cache_bytes))
        batch, width = c.shape[0], c.shape[-1]
        group = max(1, max_cpu_columns // width) if c.device.type == "cpu" else batch
        x = [run(c[start : start + group], z[start : start + group]) for start in range(0, batch, group)]
        return x[0] if len(x) == 1 else torch.cat(x)
