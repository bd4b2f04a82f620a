"""Host-side bookkeeping of KV-cache pages: a free list, page lists per owner, refcounts.

NOTE: an owner (a sequence id) holds an ordered list of pages, its block table;
context position p of the owner lives in slot p % page_size of page
pages_of(owner)[p // page_size]. Pages may be shared (a request's n completions
share the pages that hold only their common prompt), so each page counts its owners
and returns to the free list when the last one lets go.

    page ids   0       1     2     3     4     5     6
             [trash] [ a ] [a,b] [ b ] [   ] [ a ] [   ]     refcount: 1 2 1 0 1 0
    a: [1, 2, 5]   b: [2, 3]   free: [4, 6]

Page 0 is the trash page that padded tokens write to: never handed out, never freed.
"""

from __future__ import annotations

from collections import Counter, deque
from collections.abc import Iterable

TRASH_PAGE = 0


class OutOfPages(Exception):
    """Fewer free pages than asked for; nothing was allocated."""


class PageAllocator:
    def __init__(self, num_pages: int, page_size: int):
        if num_pages < 2:
            raise ValueError(f"num_pages must be >= 2 (page 0 is reserved) (got {num_pages})")
        if page_size < 1:
            raise ValueError(f"page_size must be >= 1 (got {page_size})")
        self.num_pages = num_pages
        self.page_size = page_size
        self._free: deque[int] = deque(range(1, num_pages))
        self._refcount = [0] * num_pages
        self._pages: dict[str, list[int]] = {}  # owner -> its pages in order; only owners holding >= 1 page

    @property
    def num_usable_pages(self) -> int:
        return self.num_pages - 1

    @property
    def num_free_pages(self) -> int:
        return len(self._free)

    @property
    def usage(self) -> float:
        """Fraction of usable pages in use."""
        return 1.0 - len(self._free) / self.num_usable_pages

    def pages_of(self, owner: str) -> list[int]:
        return list(self._pages.get(owner, ()))

    def refcount(self, page: int) -> int:
        return self._refcount[page]

    def pages_needed(self, owner: str, num_tokens: int) -> int:
        """How many more pages `owner` needs to hold `num_tokens` tokens."""
        return max(0, -(-num_tokens // self.page_size) - len(self._pages.get(owner, ())))

    def allocate(self, owner: str, n: int) -> list[int]:
        """Append `n` fresh pages to `owner`'s list and return them."""
        if n > len(self._free):
            raise OutOfPages(f"{owner} asked for {n} pages, {len(self._free)} free")
        new = [self._free.popleft() for _ in range(n)]
        for page in new:
            self._refcount[page] = 1
        if new:
            self._pages.setdefault(owner, []).extend(new)
        return new

    def share(self, src_owner: str, dst_owner: str, num_pages: int) -> None:
        """Give `dst_owner` (which holds nothing yet) the first `num_pages` pages of `src_owner`."""
        src = self._pages.get(src_owner, [])
        if num_pages > len(src):
            raise ValueError(f"{src_owner} holds {len(src)} pages, cannot share {num_pages}")
        if dst_owner in self._pages:
            raise ValueError(f"{dst_owner} already holds pages; share only into an empty owner")
        if num_pages:
            self._pages[dst_owner] = src[:num_pages]
            for page in src[:num_pages]:
                self._refcount[page] += 1

    def free(self, owner: str) -> None:
        """Drop all of `owner`'s pages; pages nobody else holds go back to the free list."""
        for page in self._pages.pop(owner, ()):
            self._refcount[page] -= 1
            if self._refcount[page] == 0:
                self._free.append(page)

    def check_invariant(self, live_owners: Iterable[str]) -> None:
        """Every usable page is free (refcount 0, listed once) or held by exactly refcount owners."""
        live = set(live_owners)
        assert set(self._pages) == live, f"owners {sorted(self._pages)} != live {sorted(live)}"
        held = Counter(page for pages in self._pages.values() for page in pages)
        free = Counter(self._free)
        assert self._refcount[TRASH_PAGE] == 0 and TRASH_PAGE not in held and TRASH_PAGE not in free, "page 0 handed out"
        for owner, pages in self._pages.items():
            assert pages and len(set(pages)) == len(pages), f"{owner} holds {pages}"
        for page in range(1, self.num_pages):
            rc = self._refcount[page]
            assert rc == held[page], f"page {page}: refcount {rc}, held by {held[page]} owners"
            assert free[page] == (rc == 0), f"page {page}: refcount {rc}, {free[page]} times in the free list"
