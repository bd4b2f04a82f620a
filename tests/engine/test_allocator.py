"""PageAllocator: free list, page lists, refcounts, and the invariant that no page is lost."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.allocator import OutOfPages, PageAllocator


def test_page_zero_is_never_handed_out():
    alloc = PageAllocator(num_pages=5, page_size=4)
    assert alloc.num_free_pages == 4
    assert sorted(alloc.allocate("a", 4)) == [1, 2, 3, 4]
    assert alloc.num_free_pages == 0 and alloc.usage == 1.0
    alloc.check_invariant(["a"])


def test_allocate_appends_and_out_of_pages_changes_nothing():
    alloc = PageAllocator(num_pages=6, page_size=2)
    first = alloc.allocate("a", 2)
    second = alloc.allocate("a", 1)
    assert alloc.pages_of("a") == first + second
    alloc.allocate("b", 1)
    with pytest.raises(OutOfPages):
        alloc.allocate("b", 2)
    assert len(alloc.pages_of("b")) == 1 and alloc.num_free_pages == 1
    assert alloc.allocate("c", 0) == []
    alloc.check_invariant(["a", "b"])  # asking for nothing does not make an owner


def test_usage_and_pages_needed():
    alloc = PageAllocator(num_pages=9, page_size=4)
    assert alloc.usage == 0.0
    assert alloc.pages_needed("a", 0) == 0
    assert alloc.pages_needed("a", 1) == 1
    assert alloc.pages_needed("a", 9) == 3
    alloc.allocate("a", 2)
    assert alloc.usage == 0.25
    assert alloc.pages_needed("a", 8) == 0
    assert alloc.pages_needed("a", 9) == 1
    assert alloc.pages_needed("a", 3) == 0


def test_shared_pages_return_to_the_free_list_with_their_last_owner():
    alloc = PageAllocator(num_pages=8, page_size=4)
    src = alloc.allocate("a", 3)
    alloc.share("a", "b", 2)
    alloc.share("a", "c", 2)
    assert alloc.pages_of("b") == src[:2] == alloc.pages_of("c")
    assert [alloc.refcount(p) for p in src] == [3, 3, 1]
    alloc.check_invariant(["a", "b", "c"])

    alloc.free("a")
    assert alloc.num_free_pages == 5  # only the unshared third page came back
    assert [alloc.refcount(p) for p in src[:2]] == [2, 2]
    alloc.free("b")
    alloc.free("c")
    assert alloc.num_free_pages == 7
    alloc.check_invariant([])


def test_share_checks_its_arguments():
    alloc = PageAllocator(num_pages=8, page_size=4)
    alloc.allocate("a", 2)
    with pytest.raises(ValueError, match="cannot share 3"):
        alloc.share("a", "b", 3)
    alloc.allocate("b", 1)
    with pytest.raises(ValueError, match="already holds"):
        alloc.share("a", "b", 1)
    alloc.share("a", "c", 0)
    alloc.check_invariant(["a", "b"])


def test_free_of_an_owner_with_nothing_is_a_no_op():
    alloc = PageAllocator(num_pages=3, page_size=1)
    alloc.free("nobody")
    alloc.check_invariant([])


def test_check_invariant_catches_corruption():
    alloc = PageAllocator(num_pages=4, page_size=1)
    alloc.allocate("a", 1)
    with pytest.raises(AssertionError, match="owners"):
        alloc.check_invariant(["a", "b"])
    alloc._free.append(alloc.pages_of("a")[0])  # a page both free and owned
    with pytest.raises(AssertionError, match="free list"):
        alloc.check_invariant(["a"])


@pytest.mark.parametrize(("num_pages", "page_size", "field"), [(1, 4, "num_pages"), (4, 0, "page_size")])
def test_constructor_rejects_bad_sizes(num_pages, page_size, field):
    with pytest.raises(ValueError, match=field):
        PageAllocator(num_pages, page_size)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.sampled_from("alloc share free".split()), st.integers(0, 4), st.integers(0, 4), st.integers(0, 5))))
def test_random_operations_keep_the_invariant(ops):
    """Against a model that only counts: free + distinct held pages == usable pages."""
    alloc = PageAllocator(num_pages=9, page_size=2)
    owners: dict[str, list[int]] = {}  # the model: what each owner should hold
    for op, a, b, n in ops:
        src, dst = f"o{a}", f"o{b}"
        if op == "alloc":
            before = alloc.num_free_pages
            try:
                new = alloc.allocate(src, n)
            except OutOfPages:
                assert n > before and alloc.num_free_pages == before
            else:
                owners.setdefault(src, []).extend(new)
        elif op == "share" and src != dst and dst not in owners and n <= len(owners.get(src, [])):
            alloc.share(src, dst, n)
            if n:
                owners[dst] = owners[src][:n]
        elif op == "free":
            alloc.free(src)
            owners.pop(src, None)
        owners = {o: p for o, p in owners.items() if p}
        alloc.check_invariant(owners)
        assert {o: alloc.pages_of(o) for o in owners} == owners
        held = {p for pages in owners.values() for p in pages}
        assert alloc.num_free_pages + len(held) == 8
