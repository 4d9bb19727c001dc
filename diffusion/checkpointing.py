"""Refuse to unpickle a checkpoint nobody vouched for: signed SHA-256 manifests written at save time, checked at load.

Composer 0.32.1 checkpoints are pickles: ``.pt`` files are read with ``torch.load(..., weights_only=False)`` and the
``.metadata`` of an FSDP sharded checkpoint with plain ``pickle``, so loading one runs any code planted in it.
``weights_only=True`` would not be enough on this stack either: torch 2.7.0's restricted unpickler is affected by
CVE-2026-24747 (memory corruption, fixed in torch 2.10.0). Hence these layers, built on Composer's
``CheckpointSaver`` and its ``CHECKPOINT_VALIDATION_FUNCTION`` hook:

1. Trust (:func:`guard_checkpoint_loading`): a ``load_path`` must lie inside the run's own ``save_folder``, or the
   config must say ``load_trusted: true``; anything else is a ``ValueError`` before anything is built.
2. Signed manifests (:class:`ManifestCheckpointSaver`): ``<file>.sha256`` beside every file a checkpoint consists of
   (the ``.pt``, or each shard and the ``.metadata``), uploaded with it, and in place before the ``latest`` symlink
   points at the checkpoint. Its first line is the file's SHA-256 in ``sha256sum`` format (``sha256sum -c`` checks
   it); the second, a ``#`` comment that ``sha256sum`` skips, signs that digest with HMAC-SHA-256 under a key kept
   outside every run folder and bucket (:func:`load_key`: ``$DIFFUSION_CHECKPOINT_KEY``,
   ``$DIFFUSION_CHECKPOINT_KEY_FILE``, or ``~/.config/diffusion/checkpoint.key``, created with mode 0600 on the
   first save). A digest alone proves only that the bytes did not change since someone hashed them, and whoever can
   write a checkpoint can write its digest; the signature proves that a holder of the key wrote it.
3. Verification (:func:`validate_checkpoint`): Composer calls it on each file right before unpickling it, and
   :mod:`diffusion.inference.loading` before it unpickles a ``--checkpoint``; a file without a manifest, with an
   unsigned or wrongly signed one, or whose bytes differ from it, is refused. A checkpoint from elsewhere (or from
   before manifests were signed) loads once someone has checked it and signed it deliberately:
   ``python -m diffusion.checkpointing sign FILE`` (:func:`main`).
4. Complete weights (:class:`StrictModelWeights`): a checkpoint whose model state lacks weights of the model, or
   holds others, is refused by name unless ``load_strict_model_weights: false``.

What the project shares or takes in otherwise (exported models, pretrained components, latents) is safetensors or
MDS, which hold no code.

The run-folder layout that training writes and inference reads is named here once: :data:`CONFIG_FILENAME` (the
validated config, in ``run_folder``), :data:`LATEST_CHECKPOINT` (the Trainer's symlink to the newest checkpoint in
``save_folder``), and :class:`RunConfigInCheckpoint`, which embeds the config in every checkpoint so that a
checkpoint alone rebuilds its model.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import hmac
import logging
import os
import posixpath
import re
import secrets
import sys
import tempfile
import warnings
from typing import Any, Collection, Optional, Sequence, Union

from composer import Callback
from composer.callbacks import CheckpointSaver
from composer.core import State
from composer.loggers import Logger
from composer.utils import checkpoint, dist, maybe_create_object_store_from_uri, parse_uri, partial_format
from omegaconf import DictConfig, OmegaConf
from torch import nn

__all__ = [
    'CONFIG_FILENAME',
    'KEY_ENV',
    'KEY_FILE_ENV',
    'LATEST_CHECKPOINT',
    'MANIFEST_SUFFIX',
    'SIGN_COMMAND',
    'CheckpointKeyError',
    'CheckpointManifests',
    'ManifestCheckpointSaver',
    'RunConfigInCheckpoint',
    'StrictModelWeights',
    'UntrustedCheckpointError',
    'VALIDATION_FUNCTION',
    'default_key_file',
    'describe_key_mismatch',
    'guard_checkpoint_loading',
    'is_inside',
    'key_id',
    'key_source',
    'load_key',
    'main',
    'model_state_keys',
    'sha256_file',
    'validate_checkpoint',
    'write_manifest',
]

log = logging.getLogger(__name__)

MANIFEST_SUFFIX = '.sha256'
# What Composer's CHECKPOINT_VALIDATION_FUNCTION names: a function `module.function` it imports and calls.
VALIDATION_FUNCTION = 'diffusion.checkpointing.validate_checkpoint'
# The Trainer's default `save_latest_filename` (its symlink to the newest checkpoint in save_folder); build_trainer
# keeps it, and inference loads it from a save folder.
LATEST_CHECKPOINT = 'latest-rank0.pt'
# The validated config that build_trainer writes in the run folder; inference falls back to it for checkpoints that
# embed none.
CONFIG_FILENAME = 'config.yaml'
_DIGEST = re.compile(r'\s*([0-9a-fA-F]{64})\s')
_CHUNK_BYTES = 16 * 1024 * 1024

# The signing key: hex in this environment variable (a secret manager's), else the file this one names, else
# default_key_file(). Never in a run folder or bucket: whoever can read it can sign checkpoints.
KEY_ENV = 'DIFFUSION_CHECKPOINT_KEY'
KEY_FILE_ENV = 'DIFFUSION_CHECKPOINT_KEY_FILE'
# How a user vouches for a checkpoint from elsewhere, as refusals name it (see main()).
SIGN_COMMAND = 'python -m diffusion.checkpointing sign'
_KEY_BYTES = 32  # what a new key file holds (as hex)
_MIN_KEY_BYTES = 16
# The manifest's second line: '# hmac-sha256 key <key id> <HMAC-SHA-256 of the digest>'. sha256sum skips '#' lines.
_SIGNATURE = re.compile(r'^# hmac-sha256 key ([0-9a-f]{16}) ([0-9a-f]{64})[ \t]*$', re.MULTILINE)
_SIGNED_PREFIX = b'diffusion checkpoint sha256 '
_KEY_ID_MESSAGE = b'diffusion checkpoint key id'

# Digests from the manifests of a remote checkpoint about to be loaded (verified, with their signatures), by digest:
# the manifest's URI. Composer validates its downloaded copy, a temporary file with no manifest beside it, so the
# manifests are fetched beforehand. Reset by each guard call.
_fetched_manifests: dict[str, str] = {}
# The checkpoint validate_checkpoint passed last: what StrictModelWeights names when the weights do not fit.
_last_validated: Optional[str] = None


class UntrustedCheckpointError(ValueError):
    """A checkpoint file was refused before unpickling: no manifest, an unsigned or wrongly signed one, or different
    bytes."""


class CheckpointKeyError(ValueError):
    """No usable checkpoint signing key, or ranks that would sign with different keys."""


def sha256_file(path: Union[str, os.PathLike]) -> str:
    """The hex SHA-256 of the file at ``path``, read in 16 MiB chunks (about 1.5 GB/s on one core)."""
    digest = hashlib.sha256()
    with open(path, 'rb') as f:
        while chunk := f.read(_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


# -- The signing key ------------------------------------------------------------------------------------------------


def default_key_file() -> str:
    """``$XDG_CONFIG_HOME/diffusion/checkpoint.key``, else ``~/.config/diffusion/checkpoint.key``."""
    config_home = os.environ.get('XDG_CONFIG_HOME') or os.path.join(os.path.expanduser('~'), '.config')
    return os.path.join(config_home, 'diffusion', 'checkpoint.key')


def key_source() -> str:
    """Where the key is taken from, as messages name it: ``$DIFFUSION_CHECKPOINT_KEY`` or a file path."""
    if os.environ.get(KEY_ENV):
        return f'${KEY_ENV}'
    return os.environ.get(KEY_FILE_ENV) or default_key_file()


def key_id(key: bytes) -> str:
    """A 16-hex-digit name of ``key`` that manifests and messages show (it reveals nothing of the key)."""
    return hmac.new(key, _KEY_ID_MESSAGE, hashlib.sha256).hexdigest()[:16]


def _parse_key(text: str, where: str) -> bytes:
    try:
        key = bytes.fromhex(text.strip())
    except ValueError:
        key = b''
    if len(key) < _MIN_KEY_BYTES:
        raise CheckpointKeyError(
            f'{where} is not a checkpoint key: expected at least {_MIN_KEY_BYTES} bytes in hex, such as the output of '
            f'python -c "import secrets; print(secrets.token_hex({_KEY_BYTES}))".'
        )
    return key


def _create_key_file(path: str) -> None:
    """Write a new random key to ``path`` (mode 0600) unless a file is already there; concurrent callers agree."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, mode=0o700, exist_ok=True)
    fd, partial = tempfile.mkstemp(dir=folder, prefix='.checkpoint-key.')  # mode 0600
    try:
        with os.fdopen(fd, 'w') as f:
            f.write(secrets.token_hex(_KEY_BYTES) + '\n')
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(partial, path)  # atomic, complete, and never replaces a key another process made first
        except FileExistsError:
            return
    finally:
        os.remove(partial)
    with open(path) as f:
        new_id = key_id(_parse_key(f.read(), path))
    log.warning(
        'Created the checkpoint signing key %s (key id %s). Checkpoints are signed with it and load only where it '
        'is: copy it (mode 600) to the other machines that load them, or set %s / %s; see RELIABILITY.md, section 5.',
        path,
        new_id,
        KEY_ENV,
        KEY_FILE_ENV,
    )


def load_key(create: bool = False) -> bytes:
    """The checkpoint signing key: ``$DIFFUSION_CHECKPOINT_KEY`` (hex), else the file ``$DIFFUSION_CHECKPOINT_KEY_FILE``
    names, else :func:`default_key_file`.

    Args:
        create (bool): Create the key file (32 random bytes in hex, mode 0600) when it does not exist, as a save
            does. Loading never creates one: a new key verifies nothing.

    Raises:
        CheckpointKeyError: No key (and ``create`` is false), or not a key.
    """
    value = os.environ.get(KEY_ENV)
    if value:
        return _parse_key(value, f'${KEY_ENV}')
    path = os.environ.get(KEY_FILE_ENV) or default_key_file()
    if create and not os.path.exists(path):
        _create_key_file(path)
    try:
        with open(path) as f:
            text = f.read()
    except FileNotFoundError:
        raise CheckpointKeyError(f'no checkpoint key ({path} does not exist and ${KEY_ENV} is not set)') from None
    if os.stat(path).st_mode & 0o077:
        warnings.warn(
            f'The checkpoint key {path} is open to other users: chmod 600 it (whoever reads it can sign checkpoints).',
            stacklevel=2,
        )
    return _parse_key(text, path)


def _signature(digest: str, key: bytes) -> str:
    return hmac.new(key, _SIGNED_PREFIX + digest.encode(), hashlib.sha256).hexdigest()


# -- Manifests ------------------------------------------------------------------------------------------------------


def write_manifest(path: Union[str, os.PathLike], digest: Optional[str] = None) -> str:
    """Write the signed manifest ``<path>.sha256`` and return its path.

    The first line is ``sha256sum``'s (``sha256sum -c`` checks it), the second signs the digest with the checkpoint
    key (:func:`load_key`, created if there is none yet). Writing one vouches for the file: the project does it for
    the checkpoints it saves, and :func:`main` (``sign``) for a file a user has checked.

    Args:
        path (str | os.PathLike): The checkpoint file.
        digest (str, optional): Its SHA-256, when already computed.
    """
    key = load_key(create=True)
    digest = digest or sha256_file(path)
    manifest = f'{path}{MANIFEST_SUFFIX}'
    partial = f'{manifest}.{os.getpid()}.tmp'
    with open(partial, 'w') as f:
        f.write(f'{digest}  {os.path.basename(path)}\n# hmac-sha256 key {key_id(key)} {_signature(digest, key)}\n')
    os.replace(partial, manifest)  # atomic: a crash never leaves a half-written manifest
    return manifest


def _manifest_digest(text: str, manifest: str, checkpoint: str) -> str:
    """The digest a manifest states, whether or not it is signed."""
    match = _DIGEST.match(text)
    if match is None:
        raise UntrustedCheckpointError(
            f'{manifest} is not a SHA-256 manifest (expected "<64 hex digits>  <file name>"); refusing to unpickle '
            f'{checkpoint}.'
        )
    return match.group(1).lower()


def _verified_digest(text: str, manifest: str, checkpoint: str) -> str:
    """The digest of a manifest whose signature verifies with this machine's key; raises naming what to do else."""
    digest = _manifest_digest(text, manifest, checkpoint)
    signature = _SIGNATURE.search(text)
    if signature is None:
        raise UntrustedCheckpointError(
            f'{manifest} is not signed (written by hand, by another tool or before checkpoints were signed), so it '
            f'proves nothing about who wrote {checkpoint}; refusing to unpickle it. If you know where it comes from '
            f'and trust it, sign it: {SIGN_COMMAND} {checkpoint}'
        )
    try:
        key = load_key()
    except CheckpointKeyError as error:
        raise UntrustedCheckpointError(
            f'Cannot check the signature of {manifest}: {error}; refusing to unpickle {checkpoint}. Install the key '
            f'it was signed with (RELIABILITY.md, section 5), or check the file and sign it: {SIGN_COMMAND} '
            f'{checkpoint}'
        ) from None
    signed_with, value = signature.groups()
    if hmac.compare_digest(value, _signature(digest, key)):
        return digest
    if signed_with != key_id(key):
        raise UntrustedCheckpointError(
            f'{manifest} is signed with another key (id {signed_with}; the key in {key_source()} has id '
            f'{key_id(key)}); refusing to unpickle {checkpoint}. Use the key it was signed with (RELIABILITY.md, '
            f'section 5), or check the file and sign it with yours: {SIGN_COMMAND} {checkpoint}'
        )
    raise UntrustedCheckpointError(
        f'{manifest} carries a signature that does not verify with the key in {key_source()} (forged, or its digest '
        f'edited); refusing to unpickle {checkpoint}.'
    )


def validate_checkpoint(path: Union[str, os.PathLike], specs: Optional[Sequence[tuple[int, int]]] = None) -> bool:
    """Composer's ``CHECKPOINT_VALIDATION_FUNCTION``: check a checkpoint file against its signed SHA-256 manifest.

    Composer 0.32.1 calls it with the local path of each file right before unpickling it: the monolithic ``.pt``
    (a symlink to ``load_path`` in a temporary folder, or a downloaded copy), and for a sharded checkpoint the
    ``.metadata`` and each shard it reads. It reads the file as bytes and never unpickles anything.

    Args:
        path (str | os.PathLike): The file Composer is about to load.
        specs (Sequence[tuple[int, int]], optional): The (offset, length) ranges Composer will read from a shard.
            Ignored: a manifest covers the whole file.

    Returns:
        bool: ``True``. A refused file raises instead of returning ``False``, so that the error names the file and
        the reason (Composer's own error for ``False`` names only its temporary path).

    Raises:
        UntrustedCheckpointError: The file has no manifest, its manifest is unsigned or signed with another key, or
            its bytes differ from the manifest. The message names the file and what to do.
    """
    global _last_validated
    del specs
    real = os.path.realpath(path)  # Composer symlinks a local load_path into a temporary folder
    manifest = f'{real}{MANIFEST_SUFFIX}'
    if os.path.exists(manifest):
        with open(manifest) as f:
            expected = _verified_digest(f.read(), manifest, real)
        if sha256_file(real) != expected:
            raise UntrustedCheckpointError(
                f'{real} does not match its manifest {manifest} (tampered or truncated); refusing to unpickle it.'
            )
        _last_validated = real
        return True
    digest = sha256_file(real)
    if digest in _fetched_manifests:
        _last_validated = _fetched_manifests[digest][: -len(MANIFEST_SUFFIX)]
        return True
    if _fetched_manifests:
        raise UntrustedCheckpointError(
            f'{real} matches none of the SHA-256 manifests of the checkpoint being loaded '
            f'({", ".join(sorted(_fetched_manifests.values()))}): tampered, truncated or a stale local copy; '
            'refusing to unpickle it.'
        )
    raise UntrustedCheckpointError(
        f'{real} has no SHA-256 manifest; refusing to unpickle an untrusted checkpoint (loading a Composer '
        f'checkpoint runs any code pickled in it). If you know where it comes from and trust it, sign it: '
        f'{SIGN_COMMAND} {real}'
    )


def is_inside(path: str, folder: str) -> bool:
    """Whether ``path`` is ``folder`` or lies under it: local paths with symlinks resolved, URIs by bucket and key."""
    path_backend, path_bucket, path_key = parse_uri(path)
    folder_backend, folder_bucket, folder_key = parse_uri(folder)
    if (path_backend, path_bucket) != (folder_backend, folder_bucket):
        return False
    if path_backend:
        path_key, folder_key = posixpath.normpath('/' + path_key), posixpath.normpath('/' + folder_key)
        return posixpath.commonpath([path_key, folder_key]) == folder_key
    path_key, folder_key = os.path.realpath(path_key), os.path.realpath(folder_key)
    return os.path.commonpath([path_key, folder_key]) == folder_key


def _fetch_remote_manifests(uri: str) -> None:
    """Remember the digests of the manifests of the remote checkpoint (file, sharded folder or ``.symlink``)."""
    object_store = maybe_create_object_store_from_uri(uri)
    backend, bucket, name = parse_uri(uri)
    name = partial_format(name, rank=0, local_rank=0, node_rank=0)  # Composer loads rank 0's monolithic file
    with tempfile.TemporaryDirectory() as folder:
        local = os.path.join(folder, 'object')

        def fetch(object_name: str) -> Optional[str]:
            try:
                object_store.download_object(object_name, local, overwrite=True)
            except FileNotFoundError:
                return None
            with open(local) as f:
                return f.read()

        if name.endswith('.symlink'):  # Composer's remote `latest` pointer: a text file naming the checkpoint
            target = fetch(name)
            if target is None:
                return  # nothing saved yet: autoresume starts from scratch
            name = target.strip()
        # A monolithic checkpoint has one manifest beside it; a sharded folder one per file inside it.
        names = [name + MANIFEST_SUFFIX]
        names += [n for n in object_store.list_objects(name.rstrip('/') + '/') if n.endswith(MANIFEST_SUFFIX)]
        for manifest in names:
            text = fetch(manifest)
            if text is not None:
                where = f'{backend}://{bucket}/{manifest}'
                _fetched_manifests[_verified_digest(text, where, where[: -len(MANIFEST_SUFFIX)])] = where


def guard_checkpoint_loading(cfg: Any) -> None:
    """Refuse an untrusted ``load_path`` and make Composer verify every checkpoint file before unpickling it.

    Call it before the Trainer is built, which is when Composer loads ``load_path`` or the autoresume checkpoint.
    Sets ``CHECKPOINT_VALIDATION_FUNCTION`` for this process and, when the checkpoint to load is remote, fetches its
    manifests (Composer validates a downloaded copy that has none beside it).

    Args:
        cfg (DictConfig): A validated :class:`~diffusion.config.TrainConfig`.

    Raises:
        ValueError: ``load_path`` lies outside ``save_folder`` and ``load_trusted`` is not set.
    """
    save_folder = cfg.save_folder
    if save_folder and cfg.run_name:
        save_folder = partial_format(save_folder, run_name=cfg.run_name)  # as Composer formats it
    if cfg.load_path and not (cfg.load_trusted or (save_folder and is_inside(cfg.load_path, save_folder))):
        raise ValueError(
            f"load_path={cfg.load_path!r} is outside this run's save_folder ({save_folder!r}). Composer checkpoints "
            'are pickles and loading one runs any code inside it: set load_trusted=true only if you trust this file '
            f'(it must still carry a manifest signed with your checkpoint key: {SIGN_COMMAND} FILE signs one).'
        )
    current = os.environ.get('CHECKPOINT_VALIDATION_FUNCTION')
    if current not in (None, VALIDATION_FUNCTION):
        warnings.warn(f'Replacing CHECKPOINT_VALIDATION_FUNCTION={current} by {VALIDATION_FUNCTION}.', stacklevel=2)
    os.environ['CHECKPOINT_VALIDATION_FUNCTION'] = VALIDATION_FUNCTION
    global _last_validated
    _fetched_manifests.clear()
    _last_validated = None
    if cfg.load_path and parse_uri(cfg.load_path)[0]:
        _fetch_remote_manifests(cfg.load_path)
    if cfg.autoresume and save_folder and parse_uri(save_folder)[0]:
        _fetch_remote_manifests(f'{save_folder.rstrip("/")}/{LATEST_CHECKPOINT}.symlink')


class ManifestCheckpointSaver(CheckpointSaver):
    """Composer's ``CheckpointSaver`` that writes ``<file>.sha256`` beside every checkpoint file it saves.

    Each manifest is written, and uploaded when the checkpoint is, before the checkpoint file is uploaded; the local
    ``latest`` symlink moves once every rank has written its manifests, and Composer uploads the remote one once
    every listed file (manifests included) is in the bucket. So a run killed mid-save resumes from a checkpoint that
    verifies. Rotation (``save_num_checkpoints_to_keep``) deletes a checkpoint's manifest with it. The class adds no
    state; :class:`CheckpointManifests` turns the saver the Trainer built into one. Costs one SHA-256 pass over
    each file saved (about 10 s for a 14 GB SD2 checkpoint with optimizer state and EMA).
    """

    def _upload_checkpoint(
        self, remote_file_name: str, local_file_name: str, local_remote_file_names: list[str], logger: Logger
    ) -> None:
        # Composer 0.32.1 calls this for every file a rank saved (the .pt, or its shard and the .metadata), also for a
        # local save_folder, where it hands the file to the loggers' object stores.
        manifest = write_manifest(local_file_name)
        super()._upload_checkpoint(remote_file_name + MANIFEST_SUFFIX, manifest, local_remote_file_names, logger)
        super()._upload_checkpoint(remote_file_name, local_file_name, local_remote_file_names, logger)

    def _save_checkpoint(self, state: State, logger: Logger) -> None:
        # Composer points `latest` at the new file before uploading it, so before its manifest exists: hold it back.
        latest_filename, self.latest_filename = self.latest_filename, None
        try:
            super()._save_checkpoint(state, logger)
        finally:
            self.latest_filename = latest_filename
        dist.barrier()  # every rank has written the manifests of its files
        # Composer lets only the rank that saved the monolithic file, or rank 0 of a sharded save, move `latest`.
        if latest_filename is not None and self.num_checkpoints_to_keep != 0 and dist.get_global_rank() == 0:
            saved = checkpoint.get_save_filename(state, self.filename.format(state, keep_placeholders=True))
            target = os.path.dirname(saved) if state.fsdp_sharded_state_dict_enabled else saved
            symlink = latest_filename.format(state)
            os.makedirs(os.path.dirname(symlink), exist_ok=True)
            partial = f'{symlink}.{os.getpid()}.tmp'
            with contextlib.suppress(FileNotFoundError):
                os.remove(partial)
            os.symlink(os.path.relpath(target, os.path.dirname(symlink)), partial)
            os.replace(partial, symlink)  # atomic, unlike Composer's remove-then-create

    def _rotate_checkpoints(self, sharding_enabled: bool = False) -> None:
        # Composer removes a sharded checkpoint's folder (manifests included) but only the file of a monolithic one.
        doomed = self.saved_checkpoints[: max(0, len(self.saved_checkpoints) - self.num_checkpoints_to_keep)]
        super()._rotate_checkpoints(sharding_enabled)
        if not sharding_enabled:
            for path in doomed:
                with contextlib.suppress(FileNotFoundError):
                    os.remove(path + MANIFEST_SUFFIX)


def _check_same_key_on_every_rank() -> None:
    """Create the key where missing and refuse to train when the ranks hold different keys (a collective)."""
    ids = dist.all_gather_object(key_id(load_key(create=True)))
    if len(set(ids)) > 1:
        by_rank = ', '.join(f'rank {rank}: {name}' for rank, name in enumerate(ids))
        raise CheckpointKeyError(
            f'The ranks would sign checkpoints with different keys ({by_rank}), so a resume could not verify them. '
            f'Give every machine the same key: the same {KEY_FILE_ENV} file, or {KEY_ENV} from your secret manager; '
            'see RELIABILITY.md, section 5.'
        )


class CheckpointManifests(Callback):
    """Make the Trainer's checkpoint saver a :class:`ManifestCheckpointSaver`; no effect without ``save_folder``.

    The Trainer builds its ``CheckpointSaver`` from the ``save_*`` arguments and derives the remote paths and
    autoresume from ``save_folder``. Passing our own saver as a callback instead would make Composer 0.32.1 take the
    saver's local staging folder for ``save_folder``, which breaks autoresume of sharded checkpoints from a bucket.
    So at ``INIT``, after the Trainer built its saver and before it loads a checkpoint (whose callback state is keyed
    by class name), the saver changes class; the subclass only overrides methods. Every rank then has the signing key
    (created on a machine that has none) and the ranks check that they share it: ranks on machines with different
    keys would write shards that do not verify together.
    """

    def init(self, state: State, logger: Logger) -> None:
        del logger  # unused
        if any(isinstance(callback, CheckpointSaver) for callback in state.callbacks):
            _check_same_key_on_every_rank()
        for callback in state.callbacks:
            if type(callback) is CheckpointSaver:
                # Manifests are written where Composer hands each file to the uploaders: the Trainer always names it.
                assert callback.remote_file_name is not None
                callback.__class__ = ManifestCheckpointSaver
            elif isinstance(callback, CheckpointSaver) and not isinstance(callback, ManifestCheckpointSaver):
                warnings.warn(
                    f'{type(callback).__name__} writes no SHA-256 manifests: its checkpoints will be refused on load.',
                    stacklevel=2,
                )


class RunConfigInCheckpoint(Callback):
    """Store the run's resolved config in every checkpoint, so that a checkpoint alone rebuilds its model.

    Composer saves each callback's ``state_dict`` under ``state['callbacks'][<class name>]``; this one holds the
    config as yaml text. Loading a checkpoint to resume keeps the resuming run's own config.

    Args:
        config (DictConfig | dict): The validated training config.
    """

    def __init__(self, config: Any):
        config = config if isinstance(config, DictConfig) else OmegaConf.create(config)
        self.config_yaml = OmegaConf.to_yaml(config, resolve=True)

    def state_dict(self) -> dict[str, Any]:
        return {'config': self.config_yaml}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        del state  # the resumed run's config is the one to record from now on


# -- Complete model weights -----------------------------------------------------------------------------------------


def describe_key_mismatch(missing: Collection[str], unexpected: Collection[str], shown: int = 3) -> str:
    """``'286 missing (a, b, c, ...), 2 unexpected (x, y)'``: counts and the first few names of each, sorted."""

    def part(keys: Collection[str], what: str) -> str:
        keys = sorted(keys)
        if not keys:
            return f'0 {what}'
        return f'{len(keys)} {what} ({", ".join(keys[:shown])}{", ..." if len(keys) > shown else ""})'

    return f'{part(missing, "missing")}, {part(unexpected, "unexpected")}'


def model_state_keys(model: nn.Module) -> set[str]:
    """The names a checkpoint's model state must hold for ``model``, as ``set_model_state_dict`` (which Composer
    loads with) matches them: without DDP, FSDP, activation-checkpoint and ``torch.compile`` wrapper prefixes.

    Reads names only: no collective, nothing gathered, whatever wraps the model.
    """
    # torch's own helpers for set_model_state_dict's matching (pinned torch 2.7.0; private, hence the test).
    from torch.distributed.checkpoint.state_dict import _get_fqns, _iterate_valid_model_state

    keys: set[str] = set()
    for name, _ in _iterate_valid_model_state(model):
        keys.update(_get_fqns(model, name))
    return keys


def tied_weight_names(model: nn.Module) -> set[str]:
    """The second and later names of weights shared between modules (T5's ``encoder.embed_tokens`` is its
    ``shared`` embedding), as :func:`model_state_keys` spells names: a checkpoint may hold them or not.

    ``set_model_state_dict`` matches a shared weight by its first name, while ``state_dict`` saves it under each.
    """
    from torch.distributed.checkpoint.state_dict import _get_fqns

    seen: set[int] = set()
    names: set[str] = set()
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) in seen:
            names.update(_get_fqns(model, name))
        seen.add(id(param))
    return names


class StrictModelWeights(Callback):
    """Refuse a checkpoint whose model state lacks weights of the model or holds weights the model lacks.

    Composer 0.32.1 applies ``load_strict_model_weights`` only with ``load_weights_only``: a resume (``load_path``,
    ``autoresume``) loads the model with ``strict=False``, and torch's ``set_model_state_dict`` returns without
    loading anything when the model state is empty. Either way training went on from random weights, rc 0. At
    ``INIT``, before the Trainer loads a checkpoint, this wraps the state's ``load_model_state`` (which every
    Composer load goes through) so that it first compares the checkpoint's weight names with the model's: a
    mismatch raises a ``ValueError`` naming the checkpoint, the counts and a few names of each, or, with
    ``strict=False``, is logged as a warning. Sharded checkpoints are read into the model's own names, so a weight
    missing from one already fails in ``torch.distributed.checkpoint``.

    Args:
        strict (bool): Refuse a mismatch (the ``load_strict_model_weights`` config key). Default: ``True``.
    """

    def __init__(self, strict: bool = True):
        self.strict = strict

    def init(self, state: State, logger: Logger) -> None:
        del logger  # unused
        load_model_state = state.load_model_state
        load_state_dict = state.load_state_dict

        def checked_load_model_state(state_dict: dict[str, Any], logger: Logger, strict: bool, **kwargs: Any) -> Any:
            del strict  # Composer passes False on every resume
            self.check(state, state_dict.get('model'))
            return load_model_state(state_dict, logger, strict=self.strict, **kwargs)

        def checked_load_state_dict(state_dict: dict[str, Any], logger: Logger, *args: Any, **kwargs: Any) -> Any:
            if 'model' not in state_dict:  # Composer then loads no weights at all
                self.check(state, {})
            return load_state_dict(state_dict, logger, *args, **kwargs)

        state.load_model_state = checked_load_model_state  # type: ignore[method-assign]
        state.load_state_dict = checked_load_state_dict  # type: ignore[method-assign]

    def check(self, state: State, model_state: Optional[dict[str, Any]]) -> None:
        """Raise (or warn) when ``model_state``'s names differ from the model's."""
        if model_state is None:
            if state.load_monolith_rank0_only and dist.get_global_rank() != 0:
                return  # an FSDP monolithic load: only rank 0 reads the weights
            model_state = {}
        expected = model_state_keys(state.model)
        tied = tied_weight_names(state.model)
        missing, unexpected = expected - set(model_state) - tied, set(model_state) - expected - tied
        if not missing and not unexpected:
            return
        where = _last_validated or 'The checkpoint being loaded'
        message = f"{where} does not hold the model's weights: {describe_key_mismatch(missing, unexpected)}."
        if self.strict:
            raise ValueError(
                f'{message} Loading it would leave the missing weights as initialised; set '
                'load_strict_model_weights=false to load it anyway (e.g. into a model with new adapters).'
            )
        log.warning('%s Loading it anyway (load_strict_model_weights=false).', message)


# -- python -m diffusion.checkpointing -------------------------------------------------------------------------------


def _checkpoint_files(path: str) -> list[str]:
    """The files of a checkpoint: ``path`` itself, or every file of a sharded checkpoint folder but the manifests."""
    if parse_uri(path)[0]:
        raise ValueError(
            f'{path}: download it first, check and sign the local copy, then upload its {MANIFEST_SUFFIX}.'
        )
    real = os.path.realpath(path)
    if os.path.isdir(real):
        names = sorted(n for n in os.listdir(real) if not n.endswith(MANIFEST_SUFFIX) and not n.endswith('.tmp'))
        return [os.path.join(real, n) for n in names if os.path.isfile(os.path.join(real, n))]
    if not os.path.isfile(real):
        raise FileNotFoundError(f'{path} does not exist.')
    return [real]


def _sign(path: str, force: bool) -> None:
    digest = sha256_file(path)
    manifest = f'{path}{MANIFEST_SUFFIX}'
    if os.path.exists(manifest) and not force:
        with open(manifest) as f:
            stated = _manifest_digest(f.read(), manifest, path)
        if stated != digest:
            raise UntrustedCheckpointError(
                f'{path} differs from its manifest {manifest}: it changed since it was hashed. Not signed; if you have '
                'checked this content and trust it, sign it with --force.'
            )
    write_manifest(path, digest)
    print(f'signed {path} (sha256 {digest}) with key {key_id(load_key())} from {key_source()}', file=sys.stderr)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m diffusion.checkpointing sign|verify|key``: vouch for checkpoints, check them, show the key.

    ``sign FILE_OR_FOLDER...`` writes a signed manifest beside a checkpoint file (or every file of a sharded
    checkpoint folder), after checking the file against the manifest it already has, if any (``--force`` skips
    that). Sign only what you have checked: loading a checkpoint runs whatever it holds. ``verify`` checks files as
    loading does, without unpickling them; ``key`` prints where the key is and its id (never the key).

    Returns:
        int: 0 on success, 1 when a file was refused.
    """
    parser = argparse.ArgumentParser(
        prog='python -m diffusion.checkpointing', description='Vouch for checkpoints, check them, show the key.'
    )
    commands = parser.add_subparsers(dest='command', required=True)
    sign = commands.add_parser('sign', help='Vouch for checked checkpoints: write their signed manifests.')
    sign.add_argument('paths', nargs='+', help='Checkpoint files, or sharded checkpoint folders.')
    sign.add_argument('--force', action='store_true', help='Sign even a file that differs from its old manifest.')
    verify = commands.add_parser('verify', help='Check checkpoints against their signed manifests.')
    verify.add_argument('paths', nargs='+', help='Checkpoint files, or sharded checkpoint folders.')
    commands.add_parser('key', help='Print where the signing key is and its id.')
    args = parser.parse_args(argv)
    if args.command == 'key':
        try:
            print(f'{key_source()}: key id {key_id(load_key())}')
        except CheckpointKeyError as error:
            print(f'{error}; the first checkpoint saved (or `sign`) creates {key_source()}.', file=sys.stderr)
            return 1
        return 0
    failed = False
    for path in args.paths:
        try:
            for file in _checkpoint_files(path):
                if args.command == 'sign':
                    _sign(file, args.force)
                else:
                    validate_checkpoint(file)
                    print(f'{file}: OK')
        except (OSError, ValueError) as error:
            print(f'{"sign" if args.command == "sign" else "verify"}: {error}', file=sys.stderr)
            failed = True
    if args.command == 'sign' and not failed:
        print(
            'Checkpoints load by unpickling, which runs any code they hold: sign only files you made or checked.',
            file=sys.stderr,
        )
    return 1 if failed else 0


if __name__ == '__main__':
    sys.exit(main())
