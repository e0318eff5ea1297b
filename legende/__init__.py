"""légende's Python API: caption photos and train a captioner from Python, as the command line does.

    from legende import Captioner
    cap = Captioner.load("runs/my-run")      # a run folder or a checkpoint file
    cap("photo.jpg")                         # -> "a dog runs through the grass"

    import legende
    legende.train("data/work", epochs=20)    # a new run under runs/<timestamp>

The command line (cli.py, the `legende` command) calls these, so both give the same captions.
"""

from decoder.caption_photos import CaptionResult
from decoder.decoding_options import Decoding
from legende.captioner import Captioner
from legende.training import train

__all__ = ["Captioner", "CaptionResult", "Decoding", "train"]
