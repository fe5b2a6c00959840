"""A GGUF file's block weights quantized again to another llama.cpp type, with the `gguf`
package's own quantizers (gguf.quants): llama.cpp's Q4_0 and Q8_0 of the same weights, for
comparing kiln's int4 against them. Metadata, norms and the token embedding are copied as
they are (llama.cpp's quantizer also treats the embedding and output apart)."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def requantize(source: Path, output: Path, kind: str) -> Path:
    """Write `output`: `source` with every 2-D blk.* tensor re-quantized to `kind` (Q4_0, Q8_0,
    ...). Returns `output`."""
    import gguf
    from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType, GGUFWriter

    target = GGMLQuantizationType[kind]
    reader = GGUFReader(str(source), "r")
    architecture = reader.fields["general.architecture"].contents()
    output.parent.mkdir(parents=True, exist_ok=True)
    partial = output.with_name(output.name + ".partial")
    writer = GGUFWriter(str(partial), architecture)
    for field in reader.fields.values():
        if field.name.startswith("GGUF.") or field.name in ("general.architecture",
                                                            "general.alignment"):
            continue  # written by the writer itself
        kind_of_value = field.types[0]
        sub_type = field.types[-1] if kind_of_value == GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, field.contents(), kind_of_value, sub_type=sub_type)
    for tensor in reader.tensors:
        shape = tuple(int(n) for n in reversed(tensor.shape.tolist()))  # numpy order
        source_type = GGMLQuantizationType(tensor.tensor_type)
        if tensor.name.startswith("blk.") and len(shape) == 2:
            floats = np.asarray(gguf.quants.dequantize(tensor.data, source_type),
                                dtype=np.float32).reshape(shape)
            writer.add_tensor(tensor.name, gguf.quants.quantize(floats, target), raw_dtype=target)
        elif source_type in (GGMLQuantizationType.F32, GGMLQuantizationType.F16):
            writer.add_tensor(tensor.name, np.array(tensor.data).reshape(shape))
        else:
            writer.add_tensor(tensor.name, np.array(tensor.data), raw_dtype=source_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    partial.rename(output)
    return output
