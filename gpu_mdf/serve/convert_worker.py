"""Convert one uploaded Keras file to MDF in a process of its own (the server's
``POST /v2/convert``, started by :mod:`.conversion`). Uploaded models are untrusted: the limits on address space and CPU
time are set here, before Keras is imported or the file is read, and Keras loads the
file with ``safe_mode=True`` (a Lambda's code is refused, never run).

    python -m gpu_mdf.serve.convert_worker SRC OUT NORMALIZE MODEL_ID MEMORY_BYTES CPU_SECONDS

Exit 0: OUT holds the MDF JSON. Exit 2: the model was refused; the one-line reason is
the last line on stderr.
"""

from __future__ import annotations

import resource
import sys


def main(argv: list[str]) -> int:
    src, out, normalize, model_id, memory, cpu = argv
    resource.setrlimit(resource.RLIMIT_AS, (int(memory), int(memory)))
    resource.setrlimit(resource.RLIMIT_CPU, (int(cpu), int(cpu)))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    from ..convert import keras_to_mdf, load_keras_model, save_mdf
    from ..errors import GpuMdfError
    try:
        model = load_keras_model(src)
        save_mdf(keras_to_mdf(model, normalize=normalize, model_id=model_id), out)
    except GpuMdfError as e:
        print(str(e).replace(src, "the upload").splitlines()[0], file=sys.stderr)
        return 2
    except MemoryError:
        print("the conversion ran out of its memory limit", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
