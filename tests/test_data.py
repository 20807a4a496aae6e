"""The built-in texts: the wikitext cleaner against hand-written expectations, and the out-of-domain texts shipped
in the gensim wheel (skipped, with the install command, where gensim is missing)."""

import importlib.util

import pytest

from optimum_edkm import data
from optimum_edkm.data import corpora

needs_gensim = pytest.mark.skipif(
    importlib.util.find_spec("gensim") is None,
    reason=f"the out-of-domain texts ship in the gensim wheel: {data.GENSIM_INSTALL}",
)


def test_wikitext_to_plain_keeps_prose_and_drops_markup():
    wikitext = (
        "{{Infobox person|name={{nested|x}}|born=1900}}\n"
        "[[File:Portrait.jpg|thumb|A caption with a [[link]] inside]]\n"
        "'''Ada''' was a [[mathematician|mathematical]] writer<ref name=\"a\">Some {{cite|book}}</ref> born in "
        '[[London]].<ref name="b"/> See [http://example.org the site] &amp; more.<!-- hidden -->\n'
        "\n"
        "== Life ==\n"
        '{| class="wikitable"\n| cell || {{t}}\n|}\n'
        "* She wrote ''notes''.\n"
        "[[Category:Mathematicians]]\n[[de:Ada]]\n"
        "\n"
        "== References ==\n"
        "* a reference list that is cut\n"
    )
    assert data.wikitext_to_plain(wikitext) == (
        "Ada was a mathematical writer born in London. See the site & more.\n\nLife\n\nShe wrote notes."
    )


def test_cut_at_paragraph_end():
    text = "one two\n\nthree four\n\nfive"
    assert corpora._cut_at_paragraph(text, 100) == text
    assert corpora._cut_at_paragraph(text, 15) == "one two"
    assert corpora._cut_at_paragraph("no paragraph break here", 5) == "no pa"


def test_enwiki_articles_skip_redirects_and_short_pages(tmp_path, monkeypatch):
    monkeypatch.setattr(corpora, "ENWIKI_MIN_CHARS", 10)
    monkeypatch.setattr(corpora, "ENWIKI_ARTICLE_CHARS", 40)
    page = "<page><title>{title}</title><ns>{ns}</ns><revision><text>{text}</text></revision></page>"
    dump = (
        "<mediawiki>"
        + "".join(
            [
                page.format(title="Kept", ns=0, text="First paragraph of prose.\n\nSecond paragraph, past the cut."),
                page.format(title="Moved", ns=0, text="#REDIRECT [[Kept]]"),
                page.format(title="Talk:Kept", ns=1, text="A talk page with enough text."),
                page.format(title="Kept (disambiguation)", ns=0, text="Kept may refer to many things at once."),
                page.format(title="Stub", ns=0, text="Tiny."),
            ]
        )
        + "</mediawiki>"
    )
    path = tmp_path / "dump.xml"
    path.write_text(dump, encoding="utf-8")
    assert corpora.enwiki_articles(path) == [("Kept", "First paragraph of prose.")]


@needs_gensim
def test_out_of_domain_texts_load_with_their_records(tmp_path):
    wiki = data.load_text(data.OOD_TEST_TEXT, cache_dir=tmp_path)
    news = data.load_text(data.OOD_VALIDATION_TEXT, cache_dir=tmp_path)
    assert wiki.split == "test" and news.split == "validation"
    assert len(wiki.documents) >= 50 and len(news.documents) == 300
    assert all(len(d) <= corpora.ENWIKI_ARTICLE_CHARS for d in wiki.documents)
    joined = wiki.joined()
    assert "{{" not in joined and "[[" not in joined and "<ref" not in joined
    assert "Wikipedia" in wiki.licence and "gensim" in wiki.source and "validation" in news.source
    # cached: a second load reads the same files
    assert data.load_text(data.OOD_TEST_TEXT, cache_dir=tmp_path).documents == wiki.documents
    with pytest.raises(ValueError, match="split"):
        data.load_text(data.OOD_TEST_TEXT, split="train", cache_dir=tmp_path)
    # the validation and test texts share no paragraph with each other or with the help topics
    paragraphs = lambda t: {p.strip() for p in t.joined().split("\n\n") if len(p.strip()) >= 40}  # noqa: E731
    help_topics = data.load_text(split="train", cache_dir=tmp_path)
    assert not paragraphs(wiki) & paragraphs(news) and not paragraphs(wiki) & paragraphs(help_topics)
