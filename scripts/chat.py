"""Chat with a VLM about images in the terminal; the model side is vlm.chat.Chat (the web app's chat tab too).

    python -m scripts.chat --model runs/demo/vlm/sft/export --tokenizer runs/demo/vlm/tokenizer --image scene.png

Type a question and press Enter: the answer prints token by token, and the conversation so far goes with the
next question. Commands:
    /image PATH   add an image to the next question (repeatable)
    /draw CAPTION draw an image (a model with a generation side, e.g. configs/unified): saved under --draw-dir,
                  after the /example pairs given so far (in-context generation, EMU2)
    /example PATH CAPTION   a (caption, image) example for the next /draw calls (repeatable; /reset clears)
    /reset        forget the conversation and its images
    /quit         leave (so does end of input)
--temperature 0 (the default) answers greedily; above 0 samples, with --top-k / --top-p.
Scripted: python -m scripts.chat ... < session.txt
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from lvm.prompting import save_png
from vlm.chat import Chat


class Session:
    """The conversation: turns so far, their images, and the images waiting for the next question."""

    def __init__(self, chat: Chat, sampling: dict, max_new_tokens: int, out=sys.stdout, draw_dir: str = "drawn"):
        self.chat, self.sampling, self.max_new_tokens, self.out = chat, sampling, max_new_tokens, out
        self.draw_dir, self.examples, self.drawn = Path(draw_dir), [], 0
        self.turns: list[dict] = []
        self.images: list = []
        self.pending: list = []

    def handle(self, line: str) -> bool:
        """Act on one input line; False once the session should end."""
        line = line.strip()
        if not line:
            return True
        command, _, argument = line.partition(" ")
        if command == "/quit":
            return False
        if command == "/reset":
            self.turns, self.images, self.pending, self.examples = [], [], [], []
            self.say("(conversation cleared)")
        elif command == "/image":
            self.add_image(argument.strip())
        elif command == "/draw":
            self.draw(argument.strip())
        elif command == "/example":
            path, _, caption = argument.strip().partition(" ")
            if not caption.strip():
                self.say("/example needs a path and a caption: /example scene.png a red circle on the left")
            elif self.add_image(path, quiet=True):
                self.examples.append((caption.strip(), self.pending.pop()))
                self.say(f"(example {len(self.examples)} goes before the next /draw)")
        elif command.startswith("/"):
            self.say(f"unknown command {command}: use /image PATH, /draw CAPTION, /example PATH CAPTION, /reset or /quit")
        else:
            self.ask(line)
        return True

    def add_image(self, path: str, quiet: bool = False) -> bool:
        from tokenizer.images import resolve_image

        if not path:
            self.say("/image needs a path: /image photo.png")
            return False
        if not Path(path).is_file():
            self.say(f"no image at {path}: check the path and try /image again (the conversation goes on)")
            return False
        try:
            self.pending.append(resolve_image(path, "image"))
        except ValueError as error:
            self.say(f"{error} (the conversation goes on without it)")
            return False
        if not quiet:
            self.say(f"(image {path} goes with your next question)")
        return True

    def ask(self, question: str) -> None:
        turn = {"role": "user", "content": "<image>\n" * len(self.pending) + question}
        turns, images = [*self.turns, turn], [*self.images, *self.pending]
        shown = answer = ""
        self.out.write("assistant: ")
        try:
            for answer in self.chat.stream(turns, images, self.max_new_tokens, **self.sampling):
                # the answer is re-decoded after each token; a character whose bytes are still coming shows
                # as U+FFFD at the end, so print up to it, and only what extends the text on screen
                visible = answer.rstrip("\ufffd")
                if visible.startswith(shown):
                    self.out.write(visible[len(shown) :])
                    self.out.flush()
                    shown = visible
        except ValueError as error:
            self.say(f"\n{error}")
            return
        self.say(answer[len(shown) :] if answer.startswith(shown) else f"\n(in full: {answer})")
        self.turns, self.images, self.pending = [*turns, {"role": "assistant", "content": answer}], images, []

    def draw(self, caption: str) -> None:
        from vlm.draw import draw

        if not caption:
            self.say("/draw needs a caption: /draw a small red circle on the left")
            return
        options = {k: v for k, v in self.sampling.items() if k != "seed"} | {"seed": self.sampling["seed"] or 0}
        if options["temperature"] == 0.0:  # the chat's greedy default; images want sampling
            options["temperature"] = 1.0
        try:
            image = draw(self.chat, [caption], self.examples, **options)[0]
        except ValueError as error:
            self.say(str(error))
            return
        self.drawn += 1
        path = self.draw_dir / f"draw-{self.drawn}.png"
        save_png(image, path)
        self.say(f"(drew {path})")

    def say(self, text: str) -> None:
        print(text, file=self.out, flush=True)


def main(argv: list[str] | None = None) -> Session:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--model", required=True, help="a VLM directory (vlm.VLM.from_pretrained)")
    parser.add_argument("--tokenizer", help="its text tokenizer directory (default: --model)")
    parser.add_argument("--image", action="append", default=[], help="an image for the first question (repeatable)")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    parser.add_argument("--top-k", type=int, default=None)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=None, help="for sampling")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--draw-dir", default="drawn", help="where /draw saves its images")
    args = parser.parse_args(argv)
    try:
        chat = Chat.load(args.model, args.tokenizer, args.device)
    except (ValueError, FileNotFoundError) as error:
        sys.exit(f"error: {error}")
    sampling = {"temperature": args.temperature, "top_k": args.top_k, "top_p": args.top_p, "seed": args.seed}
    session = Session(chat, sampling, args.max_new_tokens, draw_dir=args.draw_dir)
    for path in args.image:
        session.add_image(path)
    interactive = sys.stdin.isatty()
    while True:
        if interactive:
            print("you: ", end="", flush=True)
        line = sys.stdin.readline()
        if not line or not session.handle(line):
            break
    return session


if __name__ == "__main__":
    main()
