"""The local mailer: one RFC 5322 ``.eml`` file per email under ``PAPERMAIL_OUTBOX_DIR``.

Layout: ``<outbox>/<edition date>/<delivery id>-<recipient>.eml`` when the message carries
those tags, else ``<outbox>/<Message-ID>.eml``. Files appear atomically (written to a
hidden temporary file, then linked into place), so a reader never sees half an email, and
never overwrite each other: a second email for the same delivery (an operator's forced
resend) gets ``-2``, ``-3``, … like a second copy in a real inbox.
"""

from __future__ import annotations

import contextlib
import os
import re
import uuid
from pathlib import Path

from worker.config import Settings
from worker.mailers.base import AccountInfo, Mailer, SendResult
from worker.mailers.errors import AccountError
from worker.message import OutgoingMessage

# Portable file-name characters; everything else (path separators included) becomes "_".
_UNSAFE = re.compile(r"[^A-Za-z0-9._@+-]+")
_MAX_COPIES = 1000


def safe_name(part: str, limit: int = 100) -> str:
    """A file-name fragment that can neither escape the directory nor hide the file."""
    cleaned = _UNSAFE.sub("_", part).strip("._")[:limit]
    return cleaned or "_"


class OutboxMailer(Mailer):
    name = "outbox"
    # The outbox stands in for the real mailers: it refuses what they would refuse.
    non_ascii_local_part = (
        "the outbox writes the same RFC 5322 messages (ASCII headers) the real mailers "
        "send, so only ASCII can stand before the @"
    )

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings)
        self.root = Path(settings.outbox_dir)

    def path_for(self, message: OutgoingMessage) -> Path:
        """Where the first copy of ``message`` is written."""
        directory = self.root
        edition = message.tags.get("edition")
        if edition:
            directory = directory / safe_name(edition, 40)
        delivery_id = message.tags.get("delivery_id")
        if delivery_id:
            stem = f"{safe_name(delivery_id, 40)}-{safe_name(message.recipient)}"
        else:
            stem = safe_name(message.message_id.strip("<>"), 150)
        return directory / f"{stem}.eml"

    def _send(self, message: OutgoingMessage) -> SendResult:
        first = self.path_for(message)
        try:
            self._write(first, message.raw)
        except OSError as exc:
            # Unwritable or full outbox: every other message would fail too, so stop the run.
            raise AccountError(
                f"cannot write to the outbox {self.root}: {exc.strerror or exc}",
                code="OutboxUnwritable",
            ) from exc
        return SendResult(message.message_id)

    def account(self) -> AccountInfo:
        """No limits; "sending enabled" means the outbox directory can be written to.

        Probed with a hidden file created and removed again; a directory that does not exist
        yet is judged by its nearest existing parent (the first email creates it).
        """
        root = self.root.resolve()
        problems: list[str] = []
        existing = root
        while not existing.exists() and existing != existing.parent:
            existing = existing.parent
        if not existing.is_dir():
            problems.append(
                f"the outbox {root} cannot be created: {existing} is not a directory; "
                "set PAPERMAIL_OUTBOX_DIR to a directory papermail's user can write"
            )
        elif existing == root:
            probe = root / f".health-{uuid.uuid4().hex}.tmp"
            try:
                probe.open("xb").close()
                probe.unlink()
            except OSError as exc:
                problems.append(
                    f"cannot write to the outbox {root}: {exc.strerror or exc}; let "
                    "papermail's user write there, or set PAPERMAIL_OUTBOX_DIR to another "
                    "directory"
                )
        elif not os.access(existing, os.W_OK | os.X_OK):
            problems.append(
                f"the outbox {root} does not exist and {existing} is not writable, so it "
                "cannot be created; create it for papermail's user, or set "
                "PAPERMAIL_OUTBOX_DIR to another directory"
            )
        return AccountInfo(
            mailer=self.name,
            sending_enabled=not problems,
            source="outbox directory write probe",
            details={"outbox_dir": str(root)},
            problems=tuple(problems),
        )

    @staticmethod
    def _write(first: Path, raw: bytes) -> Path:
        directory = first.parent
        directory.mkdir(parents=True, exist_ok=True)
        tmp = directory / f".{first.stem}.{uuid.uuid4().hex}.tmp"
        # No fsync: the outbox is for development and demos; atomic visibility is what
        # matters to readers, not durability across a power cut.
        with open(tmp, "xb") as fh:
            fh.write(raw)
        try:
            for copy in range(1, _MAX_COPIES + 1):
                target = first if copy == 1 else first.with_name(f"{first.stem}-{copy}.eml")
                if _publish(tmp, target):
                    return target
            raise FileExistsError(f"{_MAX_COPIES} copies of {first.name} already exist")
        finally:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()


def _publish(tmp: Path, target: Path) -> bool:
    """Make ``tmp`` appear at ``target`` unless something is already there."""
    try:
        os.link(tmp, target)  # atomic and never overwrites
        return True
    except FileExistsError:
        return False
    except OSError:
        # A filesystem without hard links: check-then-replace (racy only between two
        # copies of the same delivery, which the delivery claim already prevents).
        if target.exists():
            return False
        os.replace(tmp, target)
        return True
