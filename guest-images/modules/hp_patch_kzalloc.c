// SPDX-License-Identifier: GPL-2.0
/*
 * hyperpatch test livepatch in the shape kpatch-build's patch hook and
 * klp-build's generic init produce: no static struct klp_patch. A table of
 * (function, object, replacement, sympos) entries is read at init, grouped
 * by object, and the klp_patch, its objects and their funcs are allocated
 * with kzalloc and handed to klp_enable_patch(). Exit frees them.
 */
#include <linux/module.h>
#include <linux/kernel.h>
#include <linux/livepatch.h>
#include <linux/seq_file.h>
#include <linux/slab.h>
#include <linux/string.h>

static int livepatch_cmdline_proc_show(struct seq_file *m, void *v)
{
	seq_printf(m, "%s\n", "hp_patch_kzalloc: this has been live patched");
	return 0;
}

static const char *livepatch_hp_target_message(void)
{
	return "kzalloc";
}

struct hp_func_entry {
	const char *name;
	const char *objname;	/* NULL: vmlinux */
	void *new_func;
	unsigned long sympos;
};

static const struct hp_func_entry hp_funcs[] = {
	{ "cmdline_proc_show", NULL, livepatch_cmdline_proc_show, 0 },
	{ "hp_target_message", "hp_target", livepatch_hp_target_message, 0 },
};

static struct klp_patch *hp_patch;

static bool same_object(const char *a, const char *b)
{
	return (!a && !b) || (a && b && !strcmp(a, b));
}

static void hp_free(struct klp_patch *p)
{
	struct klp_object *obj;

	if (!p)
		return;
	for (obj = p->objs; obj && (obj->name || obj->funcs); obj++)
		kfree(obj->funcs);
	kfree(p->objs);
	kfree(p);
}

static int livepatch_init(void)
{
	int i, j, nobj = 0, ret;
	const char *objnames[ARRAY_SIZE(hp_funcs)];

	for (i = 0; i < ARRAY_SIZE(hp_funcs); i++) {
		for (j = 0; j < nobj; j++)
			if (same_object(objnames[j], hp_funcs[i].objname))
				break;
		if (j == nobj)
			objnames[nobj++] = hp_funcs[i].objname;
	}
	hp_patch = kzalloc(sizeof(*hp_patch), GFP_KERNEL);
	if (!hp_patch)
		return -ENOMEM;
	hp_patch->mod = THIS_MODULE;
	hp_patch->objs = kcalloc(nobj + 1, sizeof(struct klp_object), GFP_KERNEL);
	if (!hp_patch->objs)
		goto nomem;
	for (j = 0; j < nobj; j++) {
		struct klp_object *obj = &hp_patch->objs[j];
		int n = 0, k = 0;

		for (i = 0; i < ARRAY_SIZE(hp_funcs); i++)
			n += same_object(objnames[j], hp_funcs[i].objname);
		obj->name = objnames[j];
		obj->funcs = kcalloc(n + 1, sizeof(struct klp_func), GFP_KERNEL);
		if (!obj->funcs)
			goto nomem;
		for (i = 0; i < ARRAY_SIZE(hp_funcs); i++) {
			if (!same_object(objnames[j], hp_funcs[i].objname))
				continue;
			obj->funcs[k].old_name = hp_funcs[i].name;
			obj->funcs[k].new_func = hp_funcs[i].new_func;
			obj->funcs[k].old_sympos = hp_funcs[i].sympos;
			k++;
		}
	}
	pr_info("hp_patch_kzalloc: init built %d objects\n", nobj);
	ret = klp_enable_patch(hp_patch);
	if (ret) {
		hp_free(hp_patch);
		hp_patch = NULL;
	}
	return ret;
nomem:
	hp_free(hp_patch);
	hp_patch = NULL;
	return -ENOMEM;
}

static void livepatch_exit(void)
{
	hp_free(hp_patch);
	hp_patch = NULL;
	pr_info("hp_patch_kzalloc: exit freed the patch\n");
}

module_init(livepatch_init);
module_exit(livepatch_exit);
MODULE_LICENSE("GPL");
MODULE_INFO(livepatch, "Y");
