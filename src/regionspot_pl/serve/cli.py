"""Name image regions over HTTP (LitServe) or on a web page (Gradio).

    python -m regionspot_pl.serve --head HEAD --sam_type vit_b --sam_checkpoint sam_vit_b_01ec64.pth
        --clip_model DIR [--port 8000] [--device cpu] [--vocabulary '[lvis=lvis.txt]']
        [--max_batch_size 8 --devices 1 --workers_per_device 1] [--max_regions 100 ...]
    python -m regionspot_pl.app  (the same flags; a page at http://127.0.0.1:PORT/)

``POST /predict`` takes JSON: ``image`` (base64 of a JPEG, PNG or WebP file; never a URL),
``boxes`` [[x1, y1, x2, y2], ...] in pixels and/or ``points`` (per region a list of [x, y, label]),
``vocabulary`` (class names) or ``vocabulary_id`` (a --vocabulary loaded at start), and optionally
``top_k`` (5), ``masks`` and ``embeddings`` (false). It answers ``{"regions": [...]}``, one per
region in request order: ``box``, ``labels`` and ``scores`` (top-k, best first, probabilities over
the whole vocabulary), ``iou`` (SAM's predicted IoU), ``mask`` (COCO RLE) and ``embedding`` when
asked: what ``Predictor.set_image`` + ``predict`` give. A bad request gets a 4xx JSON
``{"detail": ...}`` naming the problem. ``GET /health``, ``GET /info`` and ``/docs`` (OpenAPI) come
from LitServe.

The page is the same path in a browser: upload an image, draw boxes (two clicks) or click points,
type class names or pick a loaded vocabulary; it shows each region's mask, name and probability and
its top-k list. The batching and worker flags are the server's only.
"""

import sys

from ..config import Command, run_command
from .settings import ServeConfig

COMMAND = Command(ServeConfig, "python -m regionspot_pl.serve", __doc__)
APP_COMMAND = Command(ServeConfig, "python -m regionspot_pl.app", __doc__)


def _serve(config: ServeConfig) -> int:
    from .server import serve

    serve(config)
    return 0


def _launch_page(config: ServeConfig) -> int:
    from .page import launch

    launch(config)
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_command(COMMAND, argv, _serve, stop_hint="the server stopped", signals=False)


def app_main(argv: list[str] | None = None) -> int:
    return run_command(APP_COMMAND, argv, _launch_page, stop_hint="the page stopped")


if __name__ == "__main__":
    sys.exit(main())
